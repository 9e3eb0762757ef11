"""`make bench`: no benchmarks yet (they arrive with the performance issue)."""

print("no benchmarks yet")
