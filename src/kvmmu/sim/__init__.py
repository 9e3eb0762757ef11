"""The bottom of the simulation, below the guest and KVM: the one event order of a simulated host
(`clock`) and the cost model that turns counted events into host cycles (`cost`).  It imports
nothing of kvmmu but `errors`."""
