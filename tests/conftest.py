"""Shared fixtures. The service fixtures start real servers and FAIL (never skip) when a
service that CI provides is missing."""

pytest_plugins = [
    "tests.integration.db_fixtures",
    "tests.integration.pipeline_fixtures",
]
