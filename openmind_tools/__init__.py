"""OpenMind -> sharded stores, manifest queries, GPU patch streaming."""

__version__ = "0.2.0"  # 0.2: tar keys percent-encoded, PAX shards
