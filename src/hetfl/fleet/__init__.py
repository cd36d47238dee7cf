"""Real fleets: who is online when (availability) and per-client device capacity, from traces."""
