"""Device side of updates: fetching TUF metadata and bundles over MQTT."""
