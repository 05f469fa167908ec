"""The catalog keeps a collection's whole model fingerprint: the backend variant too.

Revision ID: 0006
Revises: 0005
"""
from db.migrations.sql_files import run_sql_file

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    run_sql_file("0006_catalog_variant.up.sql")


def downgrade() -> None:
    run_sql_file("0006_catalog_variant.down.sql")
