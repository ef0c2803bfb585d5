"""voucher partner: a channel is (client, node, partner, channel id); partner = node for existing rows

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-26
"""
from alembic import op
import sqlalchemy as sa


revision = '0003'
down_revision = '0002'
branch_labels = None
depends_on = None


def upgrade() -> None:
    for table in ('vouchers', 'settlement_items'):
        with op.batch_alter_table(table, schema=None) as batch_op:
            batch_op.add_column(sa.Column('partner', sa.String(length=42), nullable=True))
        op.execute(f'UPDATE {table} SET partner = node')
        with op.batch_alter_table(table, schema=None) as batch_op:
            batch_op.alter_column('partner', existing_type=sa.String(length=42), nullable=False)
            if table == 'vouchers':
                batch_op.drop_constraint('uq_vouchers_channel', type_='unique')
                batch_op.create_unique_constraint('uq_vouchers_channel', ['client', 'node', 'partner', 'channel_id'])


def downgrade() -> None:
    for table in ('vouchers', 'settlement_items'):
        with op.batch_alter_table(table, schema=None) as batch_op:
            if table == 'vouchers':
                batch_op.drop_constraint('uq_vouchers_channel', type_='unique')
                batch_op.create_unique_constraint('uq_vouchers_channel', ['client', 'node', 'channel_id'])
            batch_op.drop_column('partner')
