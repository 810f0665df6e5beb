"""How `darkroom generate` and `darkroom jobs` word what they show (the live behaviour is in
tests/integration/test_cli_client.py)."""

from __future__ import annotations

import io

from rich.console import Console

from darkroom.client_cli import Status, _columns, _queued_text, _where

QUEUED = {"id": "job_1", "state": "queued", "queue_position": 3, "eta_seconds": 75.4, "progress": {}, "images": []}


def test_queue_place_and_eta_read_as_a_person_says_them():
    assert _queued_text(QUEUED) == "job_1 queued, #3 in queue, ETA 1m15s"
    assert _queued_text({**QUEUED, "eta_seconds": 9.6}) == "job_1 queued, #3 in queue, ETA 10s"
    assert _queued_text({**QUEUED, "eta_seconds": None}) == "job_1 queued, #3 in queue, ETA unknown"
    assert _queued_text({**QUEUED, "queue_position": 1001}).startswith("job_1 queued, more than 1000 ahead")
    assert _where({**QUEUED, "state": "running", "progress": {"step": 4, "total": 20}}) == "step 4/20"
    assert _where({**QUEUED, "state": "succeeded", "images": [{}, {}]}) == "2 image(s)"


def test_piped_output_gets_one_line_per_change_and_columns_never_cut_an_id():
    out = io.StringIO()
    with Status(Console(file=out, width=40)) as status:
        for text in ("job_1 queued, #2 in queue", "job_1 queued, #2 in queue", "job_1 running", "job_1 running"):
            status.update(text, completed=1, total=3)
    assert out.getvalue().splitlines() == ["job_1 queued, #2 in queue", "job_1 running"]
    long_id = "job_" + "0" * 32
    table = _columns([("ID", "STATE", "PROMPT"), (long_id, "queued", "a lighthouse at dusk")])
    assert table.splitlines()[1] == f"{long_id}  queued  a lighthouse at dusk"
