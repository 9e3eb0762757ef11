"""What runs inside the VM: page-table builders, scripted programs, trace replay, a modelled OS."""
