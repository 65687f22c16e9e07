"""Frame sources: iterables of ``Frame`` behind one protocol."""
