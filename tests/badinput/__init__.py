"""Bad input everywhere a user can reach: typed kvmmu errors, nothing half-applied (docs/reliability.md)."""
