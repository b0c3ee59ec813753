"""OpenMind -> sharded stores, manifest queries, GPU patch streaming."""

# 0.5: the Zarr store is a hierarchy with collision-free group paths; 0.4: a uint8 Zarr mask array, --codec, tar
# sample spans; 0.3: crc32c in every Zarr chunk and tar member; 0.2: tar keys percent-encoded, PAX shards
__version__ = "0.5.0"
