"""Database behaviour that only matters with many nodes: migrations started on several at once."""

from __future__ import annotations

import subprocess
import sys

import sqlalchemy as sa
from alembic.script import ScriptDirectory

from darkroom.jobs.db import alembic_config

START_NODE = "import sys; from darkroom.jobs.db import migrate; migrate(sys.argv[1])"  # no lock_dir: separate machines


def test_nodes_starting_together_migrate_once(pg_url):
    """API and worker nodes share no folder for a file lock; on PostgreSQL an advisory lock serialises them.
    Processes, not threads: Alembic's migration context is process-global."""
    nodes = [subprocess.Popen([sys.executable, "-c", START_NODE, pg_url], stderr=subprocess.PIPE) for _ in range(4)]
    failures = [err.decode()[-2000:] for p in nodes if (err := p.communicate(timeout=120)[1]) and p.returncode]
    assert failures == []
    engine = sa.create_engine(pg_url)
    with engine.connect() as conn:
        heads = conn.execute(sa.text("SELECT version_num FROM alembic_version")).scalars().all()
    engine.dispose()
    script = ScriptDirectory.from_config(alembic_config(pg_url))
    assert heads == [script.get_current_head()]  # one row, at the one head (0005 merged the branches from 0001)
