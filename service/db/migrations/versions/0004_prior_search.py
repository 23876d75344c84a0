"""prior search: one row per current study (state, reason, attempts, chosen prior)

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-08 10:00:00
"""
from alembic import op
import sqlalchemy as sa


revision = '0004'
down_revision = '0003'
branch_labels = None
depends_on = None

_STATES = ('searching', 'retrieving', 'found', 'none', 'failed')


def upgrade() -> None:
    op.create_table('prior_search',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('study_id', sa.Integer(), nullable=False),
    sa.Column('state', sa.Enum(*_STATES, name='priorsearchstate', native_enum=False, length=32), nullable=False),
    sa.Column('reason', sa.Text(), nullable=False),
    sa.Column('attempts', sa.Integer(), nullable=False),
    sa.Column('started_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('deadline_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('next_attempt_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('finished_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('source', sa.String(length=16), nullable=False),
    sa.Column('prior_study_instance_uid', sa.String(length=64), nullable=True),
    sa.Column('prior_series_instance_uids', sa.Text(), nullable=False),
    sa.Column('prior_study_id', sa.Integer(), nullable=True),
    sa.ForeignKeyConstraint(['study_id'], ['study.id'], ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['prior_study_id'], ['study.id'], ondelete='SET NULL'),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('prior_search', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_prior_search_study_id'), ['study_id'], unique=True)
        batch_op.create_index(batch_op.f('ix_prior_search_state'), ['state'], unique=False)
        batch_op.create_index(batch_op.f('ix_prior_search_next_attempt_at'), ['next_attempt_at'], unique=False)
        batch_op.create_index(batch_op.f('ix_prior_search_prior_study_instance_uid'), ['prior_study_instance_uid'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('prior_search', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_prior_search_prior_study_instance_uid'))
        batch_op.drop_index(batch_op.f('ix_prior_search_next_attempt_at'))
        batch_op.drop_index(batch_op.f('ix_prior_search_state'))
        batch_op.drop_index(batch_op.f('ix_prior_search_study_id'))

    op.drop_table('prior_search')
