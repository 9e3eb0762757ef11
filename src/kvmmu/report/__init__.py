"""People-facing output: tables, the demo, the cost model."""
