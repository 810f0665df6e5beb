"""Indexes for the background sweeps (migration 0007_pruning): each sweep query reads an index range, never a whole
table, so pruning a big deployment costs what it deletes and the API never waits behind a scan.

Declared here rather than beside the tables they index so the sweeps' needs stay in one place. They index tables of
two modules, so this one is imported at the bottom of the one defined last, `darkroom.webhooks.tables` (which
`darkroom.jobs.tables` imports at its own bottom): `metadata` (and the test that migrations rebuild it) holds them
whichever table module a process imports first.
"""

from __future__ import annotations

import sqlalchemy as sa

from darkroom.jobs.tables import images, job_events, jobs
from darkroom.webhooks.tables import webhook_deliveries

# Compaction: the progress events (previews) of finished jobs, oldest first.
sa.Index("ix_job_events_type_id", job_events.c.type, job_events.c.id)
# Pruning finished jobs older than their age, per terminal state.
sa.Index("ix_jobs_state_finished_at", jobs.c.state, jobs.c.finished_at)
# Retention: is this blob still used by another image row? (content addresses are shared across rows)
sa.Index("ix_images_blob_key", images.c.blob_key)
# Pruning delivered / failed / refused webhook deliveries older than their age.
sa.Index("ix_webhook_deliveries_state_updated_at", webhook_deliveries.c.state, webhook_deliveries.c.updated_at)
# Stale worker rows: `ix_workers_state_last_heartbeat_at` (migration 0002) already serves that sweep.
