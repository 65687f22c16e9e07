"""edgefleet edge agent: local inspection on line devices, signed updates from the fleet."""

__version__ = "0.1.0"
