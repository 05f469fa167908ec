"""The catalog remembers which Qdrant holds each collection (an id in the collection's metadata).

Revision ID: 0010
Revises: 0009
"""
from db.migrations.sql_files import run_sql_file

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    run_sql_file("0010_collection_home.up.sql")


def downgrade() -> None:
    run_sql_file("0010_collection_home.down.sql")
