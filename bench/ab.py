"""A/B: one benchmark command run alternately on a base commit's code and on the working tree's, round by round.

On a shared machine the load moves by 10-20 % within minutes, so a change measured in one run and its base in
another measures the machine. Here both sides run in every round, the order flipping each round, and the report
gives every round's figure for each side beside the medians and their ratio (working tree over base).

The base commit is checked out once (`git worktree add --detach`) into a temp folder and removed afterwards. Each
run is the same command, from this checkout's `bench/`, with `PYTHONPATH` pointing at one side's `src/`; the
server processes the benchmarks start (`darkroom serve`, its workers) inherit it, so both sides run the same
benchmark code against their own darkroom. The command must print one JSON object on stdout, as the benchmarks in
this folder do; `--metric` names figures in it by dotted path (list items by index).

    .venv/bin/python bench/ab.py --base HEAD --rounds 3 \\
        --metric submit_api_only.0.accepted_per_s --metric submit_api_only.0.accepted.p99_ms \\
        -- .venv/bin/python bench/service_overhead.py --rounds 1 --phases submit --submit-clients 16
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from _common import log

ROOT = Path(__file__).resolve().parents[1]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--base", required=True, help="the commit to compare the working tree against (e.g. HEAD)")
    p.add_argument("--rounds", type=int, default=3, help="rounds; each runs both sides, the order flipping")
    p.add_argument("--metric", action="append", required=True, help="dotted path of a figure in the JSON")
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds one run may take")
    p.add_argument("command", nargs=argparse.REMAINDER, help="-- then the benchmark command")
    args = p.parse_args(argv)
    args.command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not args.command:
        p.error("give the benchmark command after --")
    return args


def figure(data: Any, path: str) -> float | None:
    """The number at `path` ('a.0.b'), or None where the run did not produce it."""
    for part in path.split("."):
        if isinstance(data, list) and part.isdigit() and int(part) < len(data):
            data = data[int(part)]
        elif isinstance(data, dict) and part in data:
            data = data[part]
        else:
            return None
    return float(data) if isinstance(data, int | float) and not isinstance(data, bool) else None


def run_side(command: list[str], src: Path, timeout: float) -> dict[str, Any]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(src), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} exited {done.returncode} on {src}:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout)


def summary(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return round(statistics.median(present), 4) if present else None


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    base = subprocess.run(
        ["git", "-C", str(ROOT), "rev-parse", "--short", args.base], capture_output=True, text=True, check=True
    ).stdout.strip()
    values: dict[str, dict[str, list[float | None]]] = {m: {"base": [], "head": []} for m in args.metric}
    with tempfile.TemporaryDirectory(prefix="darkroom-ab-") as tmp:
        tree = Path(tmp) / "base"
        subprocess.run(
            ["git", "-C", str(ROOT), "worktree", "add", "--detach", str(tree), base], check=True, capture_output=True
        )
        try:
            sides = {"base": tree / "src", "head": ROOT / "src"}
            for r in range(args.rounds):
                for side in ("base", "head") if r % 2 == 0 else ("head", "base"):
                    log(f"round {r + 1}: {side}")
                    out = run_side(args.command, sides[side], args.timeout)
                    for metric in args.metric:
                        values[metric][side].append(figure(out, metric))
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tree)], capture_output=True)
    report: dict[str, Any] = {"benchmark": "ab", "base": base, "head": "working tree", "rounds": args.rounds}
    report["command"] = args.command
    report["metrics"] = {}
    for metric, by_side in values.items():
        b, h = summary(by_side["base"]), summary(by_side["head"])
        report["metrics"][metric] = {
            **by_side,
            "base_median": b,
            "head_median": h,
            "ratio_head_vs_base": round(h / b, 4) if b and h is not None else None,
        }
    json.dump(report, sys.stdout, indent=2)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
