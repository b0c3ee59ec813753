"""OpenMind -> sharded stores, manifest queries, GPU patch streaming."""

__version__ = "0.1.0"
