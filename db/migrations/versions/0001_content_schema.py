"""Content schema: sources, documents, chunks, crawl_jobs.

Revision ID: 0001
Revises:
"""
from db.migrations.sql_files import run_sql_file

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    run_sql_file("0001_content_schema.up.sql")


def downgrade() -> None:
    run_sql_file("0001_content_schema.down.sql")
