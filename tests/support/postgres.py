"""PostgreSQL for tests: a fresh schema per test inside the run's database."""

from __future__ import annotations

import uuid
from urllib.parse import quote


def postgres_schema_url(database_url: str) -> str:
    """Create a new schema and return a URL whose connections use it (`search_path`)."""
    import psycopg

    schema = f"t_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {schema}")
    return f"{database_url}?options={quote(f'-c search_path={schema}')}"
