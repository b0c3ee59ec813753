"""OpenMind -> sharded stores, manifest queries, GPU patch streaming."""

__version__ = "0.3.0"  # 0.3: crc32c in every Zarr chunk and tar member; 0.2: tar keys percent-encoded, PAX shards
