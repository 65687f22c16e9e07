"""Aggregate telemetry on the device: the window spool, its publisher, the per-inspection
reporter, the local drift alarm and the retained device state."""
