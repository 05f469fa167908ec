"""Migrations keep their DDL in .sql files beside them; this runs one."""
from pathlib import Path

from alembic import op

VERSIONS = Path(__file__).parent / "versions"


def run_sql_file(name: str) -> None:
    sql = (VERSIONS / name).read_text(encoding="utf-8")
    # Straight to psycopg without parameters: the file may hold many statements
    # and dollar-quoted bodies that SQLAlchemy's text() would try to parse.
    op.get_bind().connection.driver_connection.execute(sql)
