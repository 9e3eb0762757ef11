"""The bottom of the simulation, below the guest and KVM: the cost model that turns counted events into
host cycles (`cost`).  It imports nothing of kvmmu but `errors`."""
