"""pruning: indexes for the sweeps that compact events and prune finished jobs, deliveries and worker rows

Revision ID: 0007_pruning
Revises: 0006_hot_path
Create Date: 2026-12-01
"""

from __future__ import annotations

from alembic import op

revision = "0007_pruning"
down_revision = "0006_hot_path"
branch_labels = None
depends_on = None

_INDEXES = {
    "ix_job_events_type_id": ("job_events", ["type", "id"]),
    "ix_jobs_state_finished_at": ("jobs", ["state", "finished_at"]),
    "ix_images_blob_key": ("images", ["blob_key"]),
    "ix_webhook_deliveries_state_updated_at": ("webhook_deliveries", ["state", "updated_at"]),
}


def upgrade() -> None:
    for name, (table, columns) in _INDEXES.items():
        op.create_index(name, table, columns)


def downgrade() -> None:
    for name, (table, _) in _INDEXES.items():
        op.drop_index(name, table_name=table)
