"""Alembic environment.

Normally run through `Database.migrate()`, which passes its open connection in
`config.attributes["connection"]`. Without one (the `alembic` CLI), the URL comes from
`sqlalchemy.url` or the Greetflow settings.
"""

from __future__ import annotations

from alembic import context

from pipeline.adapters.db import Base, Database, normalize_url

config = context.config
target_metadata = Base.metadata


def _url() -> str:
    url = config.get_main_option("sqlalchemy.url")
    if not url:
        from pipeline.settings import get_settings

        url = get_settings().resolved_database_url
    return normalize_url(url).render_as_string(hide_password=False)


def _configure(connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        version_table_schema=config.attributes.get("version_table_schema"),
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
    )


def run_migrations_offline() -> None:
    context.configure(url=_url(), target_metadata=target_metadata, literal_binds=True)
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        _configure(connection)
        with context.begin_transaction():
            context.run_migrations()
        return
    db = Database(_url())
    try:
        with db.engine.connect() as conn:
            _configure(conn)
            with context.begin_transaction():
                context.run_migrations()
    finally:
        db.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
