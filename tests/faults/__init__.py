"""Fault injection on real worker processes, the real broker, S3 server and databases."""
