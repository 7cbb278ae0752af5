"""initial schema

Revision ID: 0001
Revises: 
Create Date: 2026-11-27
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op


revision = '0001'
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('job_events',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), autoincrement=True, nullable=False),
    sa.Column('job_id', sa.String(length=32), nullable=False),
    sa.Column('tenant', sa.String(length=40), nullable=False),
    sa.Column('at', sa.Float(), nullable=False),
    sa.Column('kind', sa.String(length=16), nullable=False),
    sa.Column('state', sa.String(length=16), nullable=True),
    sa.Column('message', sa.Text(), nullable=False),
    sa.Column('data_json', sa.Text(), nullable=False),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('job_events', schema=None) as batch_op:
        batch_op.create_index('ix_job_events_job', ['job_id', 'id'], unique=False)
        batch_op.create_index('ix_job_events_tenant_kind', ['tenant', 'kind', 'id'], unique=False)

    op.create_table('tenants',
    sa.Column('name', sa.String(length=40), nullable=False),
    sa.Column('weight', sa.Float(), nullable=False),
    sa.Column('max_concurrent_jobs', sa.Integer(), nullable=False),
    sa.Column('max_concurrent_gpus', sa.Float(), nullable=False),
    sa.Column('gpu_hours_per_30d', sa.Float(), nullable=False),
    sa.Column('max_adapters', sa.Integer(), nullable=False),
    sa.Column('max_stored_bytes', sa.BigInteger(), nullable=False),
    sa.Column('generate_rpm', sa.Integer(), nullable=False),
    sa.Column('decayed_usage_gpu_s', sa.Float(), nullable=False),
    sa.Column('decayed_usage_at', sa.Float(), nullable=False),
    sa.Column('webhook_url', sa.Text(), nullable=True),
    sa.Column('webhook_secret', sa.String(length=128), nullable=True),
    sa.Column('webhook_cursor', sa.BigInteger(), nullable=False),
    sa.Column('webhook_attempts', sa.Integer(), nullable=False),
    sa.Column('webhook_next_at', sa.Float(), nullable=False),
    sa.Column('webhook_last_error', sa.Text(), nullable=True),
    sa.Column('created_at', sa.Float(), nullable=False),
    sa.CheckConstraint('weight > 0', name='ck_tenants_weight_positive'),
    sa.PrimaryKeyConstraint('name')
    )
    op.create_table('adapters',
    sa.Column('id', sa.String(length=32), nullable=False),
    sa.Column('tenant', sa.String(length=40), nullable=False),
    sa.Column('name', sa.String(length=60), nullable=False),
    sa.Column('version', sa.Integer(), nullable=False),
    sa.Column('uri', sa.Text(), nullable=False),
    sa.Column('sha256', sa.String(length=64), nullable=False),
    sa.Column('bytes', sa.BigInteger(), nullable=False),
    sa.Column('base_model', sa.Text(), nullable=False),
    sa.Column('base_fingerprint', sa.String(length=128), nullable=False),
    sa.Column('param_mode', sa.String(length=16), nullable=False),
    sa.Column('metrics_json', sa.Text(), nullable=False),
    sa.Column('status', sa.String(length=16), nullable=False),
    sa.Column('job_id', sa.String(length=32), nullable=True),
    sa.Column('created_at', sa.Float(), nullable=False),
    sa.Column('deleted_at', sa.Float(), nullable=True),
    sa.CheckConstraint("status IN ('ready', 'deleted')", name='ck_adapters_status'),
    sa.ForeignKeyConstraint(['tenant'], ['tenants.name'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('tenant', 'name', 'version', name='uq_adapters_tenant_name_version')
    )
    with op.batch_alter_table('adapters', schema=None) as batch_op:
        batch_op.create_index('ix_adapters_tenant_status', ['tenant', 'status'], unique=False)

    op.create_table('api_keys',
    sa.Column('id', sa.String(length=32), nullable=False),
    sa.Column('key_hash', sa.String(length=64), nullable=False),
    sa.Column('scope', sa.String(length=16), nullable=False),
    sa.Column('tenant', sa.String(length=40), nullable=True),
    sa.Column('label', sa.String(length=200), nullable=False),
    sa.Column('created_at', sa.Float(), nullable=False),
    sa.Column('revoked_at', sa.Float(), nullable=True),
    sa.CheckConstraint("scope = 'admin' OR tenant IS NOT NULL", name='ck_api_keys_tenant_scope_has_tenant'),
    sa.CheckConstraint("scope IN ('tenant', 'admin')", name='ck_api_keys_scope'),
    sa.ForeignKeyConstraint(['tenant'], ['tenants.name'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('key_hash')
    )
    op.create_table('jobs',
    sa.Column('id', sa.String(length=32), nullable=False),
    sa.Column('tenant', sa.String(length=40), nullable=False),
    sa.Column('name', sa.String(length=60), nullable=False),
    sa.Column('spec_json', sa.Text(), nullable=False),
    sa.Column('state', sa.String(length=16), nullable=False),
    sa.Column('attempts', sa.Integer(), nullable=False),
    sa.Column('max_attempts', sa.Integer(), nullable=False),
    sa.Column('demand_gpus', sa.Float(), nullable=False),
    sa.Column('input_bytes', sa.BigInteger(), nullable=False),
    sa.Column('error', sa.Text(), nullable=True),
    sa.Column('queue_reason', sa.Text(), nullable=True),
    sa.Column('created_at', sa.Float(), nullable=False),
    sa.Column('updated_at', sa.Float(), nullable=False),
    sa.Column('admitted_at', sa.Float(), nullable=True),
    sa.Column('started_at', sa.Float(), nullable=True),
    sa.Column('finished_at', sa.Float(), nullable=True),
    sa.Column('heartbeat_at', sa.Float(), nullable=True),
    sa.Column('progress_step', sa.Integer(), nullable=False),
    sa.Column('progress_total', sa.Integer(), nullable=False),
    sa.Column('progress_loss', sa.Float(), nullable=True),
    sa.Column('progress_eta_s', sa.Float(), nullable=True),
    sa.Column('progress_terms_json', sa.Text(), nullable=True),
    sa.Column('checkpoint_step', sa.Integer(), nullable=True),
    sa.Column('adapter_id', sa.String(length=32), nullable=True),
    sa.CheckConstraint("state IN ('queued', 'admitted', 'running', 'succeeded', 'failed', 'cancelled')", name='ck_jobs_state'),
    sa.CheckConstraint('attempts >= 0', name='ck_jobs_attempts_nonnegative'),
    sa.ForeignKeyConstraint(['tenant'], ['tenants.name'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.create_index('ix_jobs_state_created', ['state', 'created_at'], unique=False)
        batch_op.create_index('ix_jobs_tenant_created', ['tenant', 'created_at'], unique=False)

    op.create_table('usage',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), autoincrement=True, nullable=False),
    sa.Column('tenant', sa.String(length=40), nullable=False),
    sa.Column('job_id', sa.String(length=32), nullable=False),
    sa.Column('attempt', sa.Integer(), nullable=False),
    sa.Column('gpu_seconds', sa.Float(), nullable=False),
    sa.Column('started_at', sa.Float(), nullable=False),
    sa.Column('ended_at', sa.Float(), nullable=False),
    sa.CheckConstraint('gpu_seconds >= 0', name='ck_usage_nonnegative'),
    sa.ForeignKeyConstraint(['tenant'], ['tenants.name'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('job_id', 'attempt', name='uq_usage_job_attempt')
    )
    with op.batch_alter_table('usage', schema=None) as batch_op:
        batch_op.create_index('ix_usage_tenant_ended', ['tenant', 'ended_at'], unique=False)



def downgrade() -> None:
    with op.batch_alter_table('usage', schema=None) as batch_op:
        batch_op.drop_index('ix_usage_tenant_ended')

    op.drop_table('usage')
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.drop_index('ix_jobs_tenant_created')
        batch_op.drop_index('ix_jobs_state_created')

    op.drop_table('jobs')
    op.drop_table('api_keys')
    with op.batch_alter_table('adapters', schema=None) as batch_op:
        batch_op.drop_index('ix_adapters_tenant_status')

    op.drop_table('adapters')
    op.drop_table('tenants')
    with op.batch_alter_table('job_events', schema=None) as batch_op:
        batch_op.drop_index('ix_job_events_tenant_kind')
        batch_op.drop_index('ix_job_events_job')

    op.drop_table('job_events')
