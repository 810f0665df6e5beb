"""Jobs: the single source of truth. Rows, states, claims with leases, heartbeats and events."""
