"""Shard building: the record schema, per-stack conversion, the archive runner, Beam, reports, demo data."""
