"""Benchmarks: Keel's engine against raw RQ on the same Redis, database and worker class."""
