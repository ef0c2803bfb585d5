"""gateway values: this deployment's id, which operators' signed requests name

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-06
"""
from alembic import op
import sqlalchemy as sa


revision = '0002'
down_revision = '0001'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('api_gateway_values',
    sa.Column('name', sa.String(length=40), nullable=False),
    sa.Column('value', sa.String(length=200), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('name', name=op.f('pk_api_gateway_values'))
    )


def downgrade() -> None:
    op.drop_table('api_gateway_values')
