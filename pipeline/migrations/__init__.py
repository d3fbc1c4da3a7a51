"""Alembic migrations (run through `pipeline.adapters.db.Database.migrate`)."""
