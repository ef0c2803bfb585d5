"""pooled audits (issue 21): one CUSUM row per node and compute descriptor

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-05
"""

from alembic import op
import sqlalchemy as sa


revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "pooled_audits",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("node", sa.String(length=42), nullable=False),
        sa.Column("descriptor", sa.LargeBinary(length=8), nullable=False),
        sa.Column("statistic", sa.Float(), nullable=False),
        sa.Column("steps", sa.Integer(), nullable=False),
        sa.Column("last_receipt_id", sa.Integer(), nullable=False),
        sa.Column("window", sa.Text(), nullable=False),
        sa.Column("convictions", sa.Integer(), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_pooled_audits")),
        sa.UniqueConstraint("node", "descriptor", name="uq_pooled_audits_node_descriptor"),
    )
    with op.batch_alter_table("pooled_audits", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_pooled_audits_node"), ["node"], unique=False)


def downgrade() -> None:
    op.drop_table("pooled_audits")
