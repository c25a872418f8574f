"""The Zarr feature store: manifest, shard-aligned writer, readers, verification."""
