"""Fleet server workers: long-running services attached to the MQTT transport."""
