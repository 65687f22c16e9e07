"""Where verdicts go on the device: results.db, the evidence store and line outputs."""
