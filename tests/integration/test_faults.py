"""Faults against real processes: `darkroom serve` (API only) and `darkroom worker` processes on one SQLite database.

- a worker SIGKILLed in the middle of a batch: every job still succeeds exactly once (0 lost, 0 duplicated);
- a poison job that gets its worker killed every time it runs is dead-lettered after `max_attempts` starts, while
  the other jobs finish;
- a poison job that makes the device fail every time (the real engine raising a CUDA error from inside its UNet, see
  tests/support/fault_worker.py) is given up after `recovery.poison_after` failures, uncharged until then, while the
  same worker process recovers and runs the other jobs.
"""

from __future__ import annotations

import os
import signal
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

from .harness import Cluster, Proc, wait_until

pytestmark = pytest.mark.integration

TERMINAL = {"succeeded", "failed", "cancelled", "dead"}
MAX_ATTEMPTS = 2  # each start of the SIGKILL poison job costs a worker process start: keep the test short


class Faults:
    def __init__(self, cluster: Cluster) -> None:
        self.cluster = cluster
        self.http = cluster.client()
        self.db = sa.create_engine(f"sqlite:///{cluster.data_dir / 'darkroom.db'}")
        self.workers: dict[str, Proc] = {}

    def start_worker(self, name: str, faulty: bool = False) -> Proc:
        if faulty:
            args = [sys.executable, "-m", "tests.support.fault_worker", "worker", "--worker-id", name]
            proc = self.cluster._spawn(args, name)
        else:
            proc = self.cluster.start_worker(name)
        self.workers[name] = proc
        self.wait(lambda: f"worker {name} started" in proc.output(), 180, f"{name} to start")
        return proc

    def kill(self, name: str) -> None:
        self.workers[name].kill(signal.SIGKILL)
        self.workers[name].popen.wait(10)

    def wait(self, predicate, timeout: float, what: str):  # type: ignore[no-untyped-def]
        try:
            return wait_until(predicate, timeout=timeout, interval=0.1, what=what)
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{self.cluster.logs()}") from None

    def submit(self, **body: object) -> str:
        response = self.http.post("/v1/jobs", json={"width": 64, "height": 64, "prompt": "a cube", **body})
        assert response.status_code == 202, response.text
        return response.json()["id"]

    def rows(self, sql: str, **params: object) -> list[sa.Row]:
        with self.db.connect() as conn:
            return conn.execute(sa.text(sql), params).all()

    def states(self, ids: list[str]) -> dict[str, str]:
        return {r.id: r.state for r in self.rows("SELECT id, state FROM jobs") if r.id in ids}

    def wait_finished(self, ids: list[str], timeout: float = 240) -> dict[str, str]:
        self.wait(lambda: set(self.states(ids).values()) <= TERMINAL, timeout, f"{len(ids)} jobs to finish")
        return self.states(ids)

    def events(self, job_id: str, kind: str) -> list[sa.Row]:
        return self.rows("SELECT data FROM job_events WHERE job_id = :j AND type = :t", j=job_id, t=kind)

    def running(self, min_step: int = 1) -> dict[str, str]:
        """Running jobs past `min_step`, with their worker."""
        query = "SELECT id, lease_owner FROM jobs WHERE state = 'running' AND progress_step >= :s"
        return {r.id: r.lease_owner for r in self.rows(query, s=min_step)}

    def check_exactly_once(self, ids: list[str]) -> None:
        states = self.states(ids)
        assert set(states.values()) == {"succeeded"}, f"{states}\n{self.cluster.logs()}"
        succeeded = Counter(r.job_id for r in self.rows("SELECT job_id FROM job_events WHERE type = 'succeeded'"))
        images = Counter(r.job_id for r in self.rows("SELECT job_id FROM images"))
        assert all(succeeded[i] == 1 and images[i] == 1 for i in ids), (succeeded, images)

    def close(self) -> None:
        self.http.close()
        self.db.dispose()
        self.cluster.close()


@pytest.fixture
def faults(tmp_path, models_dir) -> Iterator[Faults]:
    env = {
        "DARKROOM_MAX_ATTEMPTS": str(MAX_ATTEMPTS),
        "DARKROOM_RECOVERY__FATAL_BACKOFF_SECONDS": "0.2",
        "DARKROOM_RECOVERY__POISON_AFTER": "3",
        "DARKROOM_TEST_FAULTY_MODELS": "tiny-single",
        "DARKROOM_SECURITY__WATERMARK": "false",
        "DARKROOM_SECURITY__C2PA": "false",
    }
    cluster = Cluster(tmp_path, models_dir, env=env)
    try:
        cluster.start_server(workers=0)
        setup = Faults(cluster)
    except BaseException:
        cluster.close()
        raise
    try:
        yield setup
    finally:
        setup.close()


def test_a_worker_sigkilled_mid_batch_loses_and_duplicates_nothing(faults):
    faults.cluster.env["DARKROOM_MAX_BATCH"] = "4"
    ids = [faults.submit(steps=30, seed=i) for i in range(8)]
    faults.start_worker("w1")
    busy = faults.wait(lambda: faults.running(min_step=2), 120, "w1 mid-job")
    assert set(busy.values()) == {"w1"}
    faults.kill("w1")
    faults.start_worker("w2")
    faults.wait_finished(ids)
    faults.check_exactly_once(ids)


def test_a_job_that_gets_its_worker_killed_every_time_is_dead_lettered_while_others_finish(faults):
    faults.cluster.env["DARKROOM_MAX_BATCH"] = "1"
    poison = faults.submit(steps=150, width=128, height=128, seed=1, priority="high")
    others = [faults.submit(steps=4, seed=s) for s in range(2, 6)]
    generation = 0
    killed: set[str] = set()

    def poison_owner() -> str | bool:
        """The live worker running the poison job (a killed one keeps its lease until the reaper sees it expire)."""
        owner = faults.running().get(poison)
        if owner and owner not in killed:
            return owner
        return faults.states([poison])[poison] == "dead"

    faults.start_worker("w0")
    while faults.states([poison])[poison] != "dead":
        assert generation < 5, f"the poison job was not dead-lettered\n{faults.cluster.logs()}"
        running = faults.wait(poison_owner, 120, "the poison job")
        if running is True:
            break
        assert isinstance(running, str)
        faults.kill(running)
        killed.add(running)
        generation += 1
        faults.start_worker(f"w{generation}")
    states = faults.wait_finished([poison, *others])
    assert states[poison] == "dead"
    assert len(faults.events(poison, "started")) == MAX_ATTEMPTS, "dead-lettered after max_attempts starts"
    faults.check_exactly_once(others)


def test_a_job_that_breaks_the_device_every_time_is_given_up_and_the_worker_recovers(faults):
    poison = faults.submit(steps=4, seed=1, priority="high", model="tiny-single")
    others = [faults.submit(steps=4, seed=s, model="tiny-diffusers") for s in range(2, 5)]
    worker = faults.start_worker("gpu0", faulty=True)
    states = faults.wait_finished([poison, *others])
    error = faults.http.get(f"/v1/jobs/{poison}").json()["error"]
    assert states[poison] == "failed" and error["code"] == "poison_job", error
    released = [e for e in faults.events(poison, "requeued") if "engine_fatal" in e.data]
    assert len(released) == 2, "released uncharged twice, given up at the third device failure"
    faults.check_exactly_once(others)
    assert worker.alive(), "a device failure pauses the worker; it does not kill it"
    listed = {w["id"]: w["state"] for w in faults.http.get("/v1/workers").json()}
    faults.wait(
        lambda: {w["id"]: w["state"] for w in faults.http.get("/v1/workers").json()}.get("gpu0") == "active",
        30,
        f"gpu0 active again (was {listed.get('gpu0')})",
    )


def _children(pid: int) -> list[int]:
    """Live child processes of `pid`, from /proc (field 4 of /proc/<child>/stat is the parent's pid)."""
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid and fields[0] != "Z":
                out.append(int(entry.name))
    return out


def test_serve_runs_its_workers_in_a_supervised_child_process_that_dies_with_it(tmp_path, models_dir):
    """The workers denoise in a process of their own (not holding the API's GIL), both of `--workers 2` (the second
    once died importing torch while the first did); killed, the process is restarted and the job it held still
    finishes; and killing `serve` takes its workers with it, leaving no orphan holding leases."""
    cluster = Cluster(tmp_path, models_dir, env={"DARKROOM_RECOVERY__RESTART_BACKOFF_SECONDS": "0.2"})
    try:
        server = cluster.start_server(workers=2)
        with cluster.client() as http:
            wait_until(lambda: len(_children(server.pid)) == 2, timeout=60, what="the worker processes")
            first, other = _children(server.pid)

            def active() -> list[str]:
                return [w["id"] for w in http.get("/v1/workers").json() if w["state"] == "active"]

            wait_until(lambda: len(active()) == 2, timeout=120, what=f"two active workers\n{cluster.logs()}")
            assert "crashed" not in server.output()
            os.kill(first, signal.SIGKILL)
            wait_until(
                lambda: len(kids := _children(server.pid)) == 2 and first not in kids, timeout=60, what="a new worker"
            )
            job = http.post("/v1/jobs", json={"prompt": "after the restart", "width": 64, "height": 64, "steps": 2})
            assert job.status_code == 202, job.text
            job_id = job.json()["id"]
            wait_until(
                lambda: http.get(f"/v1/jobs/{job_id}").json()["state"] == "succeeded",
                timeout=120,
                what=f"the job on the restarted worker\n{cluster.logs()}",
            )
            assert "worker process" in server.output() and "restarting" in server.output()
        workers = _children(server.pid)
        server.kill(signal.SIGKILL)
        for pid in workers:
            wait_until(lambda p=pid: not Path(f"/proc/{p}").exists() or _zombie(p), timeout=30, what="workers gone")
    finally:
        cluster.close()


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True
