"""The embedding endpoint's budget, shared by every daemon of the database.

Revision ID: 0008
Revises: 0007
"""
from db.migrations.sql_files import run_sql_file

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    run_sql_file("0008_embedding_budget.up.sql")


def downgrade() -> None:
    run_sql_file("0008_embedding_budget.down.sql")
