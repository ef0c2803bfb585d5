"""unforgeable reputation (issue 21): receipts' client countersignatures, counted work, per client-node budgets

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-05
"""

from alembic import op
import sqlalchemy as sa


revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("receipts", schema=None) as batch_op:
        batch_op.add_column(sa.Column("client_signature", sa.LargeBinary(length=65), nullable=True))
        batch_op.add_column(sa.Column("work", sa.String(length=10), nullable=True))
    with op.batch_alter_table("nodes", schema=None) as batch_op:
        batch_op.add_column(sa.Column("work_steps", sa.Integer(), nullable=False, server_default="0"))
        batch_op.add_column(sa.Column("work_amount", sa.String(length=80), nullable=False, server_default="0"))
    op.create_table(
        "client_nodes",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("client", sa.String(length=42), nullable=False),
        sa.Column("node", sa.String(length=42), nullable=False),
        sa.Column("countersigned_steps", sa.Integer(), nullable=False),
        sa.Column("countersigned_amount", sa.String(length=80), nullable=False),
        sa.Column("counted_steps", sa.Integer(), nullable=False),
        sa.Column("counted_amount", sa.String(length=80), nullable=False),
        sa.Column("backed", sa.String(length=80), nullable=False),
        sa.Column("backed_read_at", sa.Float(), nullable=False),
        sa.Column("report_nonce", sa.String(length=80), nullable=False),
        sa.Column("report_tokens", sa.Float(), nullable=False),
        sa.Column("report_at", sa.Float(), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_client_nodes")),
        sa.UniqueConstraint("client", "node", name="uq_client_nodes_pair"),
    )
    with op.batch_alter_table("client_nodes", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_client_nodes_client"), ["client"], unique=False)
        batch_op.create_index(batch_op.f("ix_client_nodes_node"), ["node"], unique=False)


def downgrade() -> None:
    op.drop_table("client_nodes")
    with op.batch_alter_table("nodes", schema=None) as batch_op:
        batch_op.drop_column("work_amount")
        batch_op.drop_column("work_steps")
    with op.batch_alter_table("receipts", schema=None) as batch_op:
        batch_op.drop_column("work")
        batch_op.drop_column("client_signature")
