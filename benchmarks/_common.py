"""Shared pieces of the benchmark scripts (run as ``python benchmarks/<name>.py``)."""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace

# A script run from this directory has it as sys.path[0], where benchmarks/http.py would shadow
# the standard library's ``http`` package (http.client: httpx, uvicorn, starlette...). The
# benchmarks import this module before anything that imports http: keep the directory, last.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _HERE] + [_HERE]

from sqlalchemy import text  # noqa: E402
from sqlalchemy.engine import make_url  # noqa: E402

from charter import A, R  # noqa: E402
from charter.ratelimit import DEFAULT_CLASSES, RateLimiter  # noqa: E402
from charter.storage import make_engine  # noqa: E402

PG_URL = os.environ.get(
    "CHARTER_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/charter_test"
)


def rate_limits() -> RateLimiter:
    """Charter's default rate limits (in-process store, every default class and its failure
    mode and concurrency), with limits no benchmark reaches: every op is a whole call, and the
    ``rate_limit`` stage a default Charter runs is in the timed path."""
    return RateLimiter(
        "memory://",
        classes=[replace(c, limit="1000000000/minute") for c in DEFAULT_CLASSES.values()],
    )


# The rule every policy benchmark measures: an approver of the invoice's tenant (the tenant
# is built in), invoice submitted, amount within the actor's limit, not the creator.
APPROVER_RULE = (
    A.has_role("approver")
    & (R.state == "submitted")
    & (R.amount <= A.approval_limit)
    & (R.created_by != A.id)
)


def pg_bench_url(database: str) -> str | None:
    """URL of a benchmark database beside the test one, created if missing; None if unusable."""
    base = make_url(PG_URL)
    target = base.set(database=database)
    admin = make_engine(base.set(database="postgres").render_as_string(hide_password=False))
    try:
        with admin.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            exists = conn.execute(
                text("SELECT 1 FROM pg_database WHERE datname = :n"), {"n": database}
            ).scalar()
            if not exists:
                conn.execute(text(f'CREATE DATABASE "{database}"'))
    except Exception as exc:
        print(f"PostgreSQL unavailable at {target.render_as_string()}: {exc!r}", file=sys.stderr)
        return None
    finally:
        admin.dispose()
    return target.render_as_string(hide_password=False)


def machine() -> dict[str, str]:
    """What the figures were measured on: cores, CPU, architecture, Python, git revision."""
    try:
        rev = subprocess.run(
            ["git", "describe", "--always", "--dirty"], capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        rev = "unknown"
    cpu = "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if "model name" in line)
    except (OSError, StopIteration):
        pass
    return {
        "nproc": str(os.cpu_count()),
        "cpu": cpu,
        "arch": platform.machine(),
        "python": platform.python_version(),
        "rev": rev,
    }


def loadavg() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def interleave(
    ops: Mapping[str, Callable[[int], None]],
    orders: Sequence[Sequence[str]],
    rounds: int,
    per_round: int,
    next_ids: Callable[[int], list[int]],
) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Run the paths interleaved op by op; return per-op seconds and per-round means.

    Each step runs every path once, in ``orders[step % len(orders)]``, so all paths
    share every moment of the run: a VM whose speed drifts mid-run moves their
    medians alike (block-wise, a block that met a slow spell decided the figure;
    see benchmarks/RESULTS.md). The per-round means serve as a drift check.
    """
    clock = time.perf_counter
    per_op: dict[str, list[float]] = {side: [] for side in ops}
    means: dict[str, list[float]] = {side: [] for side in ops}
    step = 0
    for _ in range(rounds):
        this_round: dict[str, list[float]] = {side: [] for side in ops}
        for _ in range(per_round):
            order = orders[step % len(orders)]
            for side, item_id in zip(order, next_ids(len(order)), strict=True):
                t = clock()
                ops[side](item_id)
                this_round[side].append(clock() - t)
            step += 1
        for side, times in this_round.items():
            per_op[side].extend(times)
            means[side].append(statistics.fmean(times))
    return per_op, means


def print_figures(figures: Mapping[str, float | None]) -> None:
    """The benchmark's last line: its figures as one JSON object, rounded to 3 decimals."""
    print(json.dumps({k: (None if v is None else round(v, 3)) for k, v in figures.items()}))
