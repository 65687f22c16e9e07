"""fleet_server: the operator's side of edgefleet (model registry, rollouts, telemetry)."""
