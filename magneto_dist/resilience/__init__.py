"""Fault tolerance: fault injection now; the supervisor (restarts, heartbeats) is later work."""
