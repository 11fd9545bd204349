"""HTTP throughput: the reference service's approval endpoint vs the same endpoint by hand.

What is timed (issue 12): requests per second of ``POST /invoices/{id}/approve``
(body ``{"note": "ok"}``, bob's bearer token) served by uvicorn with **2 worker
processes** on PostgreSQL, for two applications (benchmarks/_http_servers.py):

(charter) the reference service as users get it: ``charter.demo.app:create_app`` on a
    default Charter (rate limits on: the ``rate_limit`` stage and the per-address
    middleware run, with limits no run reaches: ``_common.rate_limits()``), the demo's
    bearer-token authenticator, the gate's pipeline (validation, tenant-scoped locked
    load, workflow step, rule, handler, version bump, sealed audit entry, commit), the
    answer with ``ETag``, ``RateLimit`` fields and ``X-Request-ID``.
(bare) a FastAPI endpoint doing the same work by hand: the same token verification
    (``TokenSigner.authenticate`` + the demo's directory lookup) and scope, the demo's
    ``Approve`` input model and approval rule, the fastest hand-written SQLAlchemy Core
    transaction (statements built once: ``SELECT ... FOR UPDATE``, ``UPDATE ... version
    + 1``, the HMAC-chained audit row of benchmarks/gate_overhead.py's ``HandAudit``,
    ``COMMIT``), the same JSON answer with its ``ETag``.

Why approval of fresh invoices: it is the reference service's typical state change
(a locked record, a rule, a workflow step, an audit row), and each request changes a
record no one touched yet, on both sides alike (a repeatable action would let the
second call of a record be refused by its workflow). Every answer must be 200; at the
end the rows approved and the audit rows written are counted against the requests.

Load: a raw asyncio HTTP/1.1 keep-alive client in this process (the lowest client
overhead we could write: one preformatted request per id, the response read by its
Content-Length), ``--connections`` connections opened afresh each round, a fixed
number of requests per side and round. **The client competes with the servers for the
machine's 2 cores**, and so does PostgreSQL: what is measured is the whole loopback
system's throughput, where the client's share is the same per request on both sides.

Method: both servers start as subprocesses (``python -m uvicorn ... --workers 2``) and
stay up; after a warm-up of each, rounds alternate the order of the sides (ABBA), each
round's rps per side is requests / wall time; the figure ``ratio`` is the median
charter rps / the median bare rps (target >= 0.65), and the median of the per-round
ratios is printed as a drift check. ``--quick`` runs fewer, shorter rounds (< 60 s).
The last line of output is one JSON object.

PostgreSQL: ``$CHARTER_PG_URL`` with the database name replaced by ``--database``
(default ``charter_bench_http``), created if missing; its ``invoices`` and
``charter_audit`` rows are replaced at each run.
"""

# ruff: noqa: E402 - sys.path is set before the imports that read it (see below)

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
# Run as a script, this directory is sys.path[0], where this file would shadow the standard
# library's ``http`` package (uvicorn, httpx and asyncio's users import it): move it last.
if sys.path and Path(sys.path[0] or ".").resolve() == HERE:
    sys.path.append(str(HERE))
    del sys.path[0]

import argparse
import asyncio
import contextlib
import json
import os
import socket
import statistics
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import IO

import _common
from sqlalchemy import text
from sqlalchemy.engine import Engine

from charter.demo.app import DEMO_MIGRATIONS, demo_scopes
from charter.demo.service import DEMO_USERS
from charter.migrate import upgrade
from charter.storage import make_engine
from charter.tokens import TokenSigner

ROOT = HERE.parent
SIDES = ("charter", "bare")
FACTORIES = {"charter": "charter_app", "bare": "bare_app"}
WORKERS = 2
TENANT, APPROVER, CREATOR = "acme", "bob", "alice"
BODY = b'{"note":"ok"}'
TOKEN_SECRET = "http-bench-token-secret-0123456789abcdef"


@dataclass(frozen=True)
class Sizes:
    connections: int
    requests: int  # per side and round
    rounds: int
    warmup: int  # per side


QUICK = Sizes(connections=16, requests=300, rounds=6, warmup=300)
FULL = Sizes(connections=16, requests=1000, rounds=10, warmup=600)


# -- the database -----------------------------------------------------------------------


def prepare(engine: Engine, rows: int) -> None:
    """The demo's schema by migration; ``rows`` submitted invoices of alice's, no audit rows."""
    upgrade(engine, extra_locations=DEMO_MIGRATIONS)
    with engine.begin() as conn:
        conn.execute(text("DELETE FROM charter_audit"))
        conn.execute(text("DELETE FROM invoices"))
        conn.execute(
            text(
                "INSERT INTO invoices (id, tenant_id, customer, amount, currency, state, version,"
                " created_by, created_at, submitted_by) SELECT g, :tenant, 'ACME Corp', 1200,"
                " 'EUR', 'submitted', 2, :creator, now(), :creator"
                " FROM generate_series(1, :n) AS g"
            ),
            {"tenant": TENANT, "creator": CREATOR, "n": rows},
        )
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(text("VACUUM ANALYZE invoices"))
        conn.execute(text("VACUUM ANALYZE charter_audit"))


def counts(engine: Engine) -> tuple[int, int]:
    """(invoices approved by the approver, audit rows of invoice.approve allowed)."""
    with engine.connect() as conn:
        approved = conn.execute(
            text("SELECT count(*) FROM invoices WHERE state = 'approved' AND approved_by = :b"),
            {"b": APPROVER},
        ).scalar_one()
        audited = conn.execute(
            text(
                "SELECT count(*) FROM charter_audit WHERE action = 'invoice.approve'"
                " AND decision = 'allow' AND outcome = 'ok'"
            )
        ).scalar_one()
    return int(approved), int(audited)


# -- the servers ------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Server:
    side: str
    port: int
    process: subprocess.Popen[bytes]
    log: IO[bytes]

    def output(self) -> str:
        self.log.flush()
        self.log.seek(0)
        return self.log.read().decode(errors="replace")[-4000:]


@contextlib.contextmanager
def serving(url: str) -> Iterator[dict[str, Server]]:
    """Both applications under ``uvicorn --workers 2``, stopped (SIGTERM, then kill) at the end."""
    env = dict(os.environ, HTTPBENCH_DB_URL=url, HTTPBENCH_TOKEN_SECRET=TOKEN_SECRET)
    servers: dict[str, Server] = {}
    try:
        for side in SIDES:
            port = free_port()
            log = tempfile.TemporaryFile()  # noqa: SIM115 - closed in the finally below
            command = [
                sys.executable, "-m", "uvicorn", f"benchmarks._http_servers:{FACTORIES[side]}",
                "--factory", "--workers", str(WORKERS), "--host", "127.0.0.1",
                "--port", str(port), "--log-level", "warning", "--no-access-log",
            ]  # fmt: skip
            process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=log)
            servers[side] = Server(side, port, process, log)
        for server in servers.values():
            wait_ready(server)
        yield servers
    finally:
        for server in servers.values():
            server.process.terminate()
        for server in servers.values():
            try:
                server.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                server.process.kill()
                server.process.wait()
            server.log.close()


def wait_ready(server: Server, timeout: float = 60.0) -> None:
    """Until the server answers HTTP on its port (any status)."""
    deadline = time.monotonic() + timeout
    probe = b"GET /ready HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError(f"the {server.side} server exited:\n{server.output()}")
        try:
            with socket.create_connection(("127.0.0.1", server.port), timeout=1) as s:
                s.sendall(probe)
                if s.recv(16).startswith(b"HTTP/1.1 "):
                    return
        except OSError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"the {server.side} server did not start:\n{server.output()}")


# -- the load ---------------------------------------------------------------------------


class Failed(Exception):
    """A response other than 200 (the run is refused: a figure needs every call to succeed)."""


def request_bytes(invoice: int, token: str) -> bytes:
    return (
        f"POST /invoices/{invoice}/approve HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        f"Authorization: Bearer {token}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(BODY)}\r\n\r\n"
    ).encode() + BODY


async def read_response(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    headers = {}
    for line in lines[1:]:
        if line:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
    body = await reader.readexactly(int(headers.get("content-length", "0")))
    return status, headers, body


async def load(port: int, ids: list[int], token: str, connections: int) -> float:
    """Send one approval per id over ``connections`` keep-alive connections; seconds taken."""
    pending = iter(ids)
    streams = [await asyncio.open_connection("127.0.0.1", port) for _ in range(connections)]

    async def worker(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        for invoice in pending:
            writer.write(request_bytes(invoice, token))
            status, _, body = await read_response(reader)
            if status != 200:
                raise Failed(f"{status} for invoice {invoice}: {body[:300]!r}")

    start = time.perf_counter()
    try:
        await asyncio.gather(*(worker(r, w) for r, w in streams))
        return time.perf_counter() - start
    finally:
        for _, writer in streams:
            writer.close()
        for _, writer in streams:
            with contextlib.suppress(OSError):
                await writer.wait_closed()


async def sample(port: int, invoice: int, token: str) -> tuple[dict[str, str], dict[str, object]]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request_bytes(invoice, token))
        status, headers, body = await read_response(reader)
    finally:
        writer.close()
    if status != 200:
        raise Failed(f"{status} for invoice {invoice}: {body[:300]!r}")
    return headers, json.loads(body)


class Ids:
    """Fresh submitted invoices: each side its own range, handed out in order."""

    def __init__(self, per_side: int) -> None:
        self.next = {side: 1 + i * per_side for i, side in enumerate(SIDES)}
        self.last = {side: (i + 1) * per_side for i, side in enumerate(SIDES)}

    def take(self, side: str, n: int) -> list[int]:
        start = self.next[side]
        self.next[side] += n
        if self.next[side] - 1 > self.last[side]:
            raise RuntimeError("out of fresh invoices")
        return list(range(start, start + n))


async def compare_answers(servers: dict[str, Server], ids: Ids, token: str) -> list[str]:
    """Both sides answer the same JSON fields and an ETag (one request each)."""
    answers = {s: await sample(servers[s].port, ids.take(s, 1)[0], token) for s in SIDES}
    (ch, cb), (bh, bb) = answers["charter"], answers["bare"]
    if set(cb) != set(bb) or "etag" not in bh or "etag" not in ch:
        raise Failed(f"the answers differ: {sorted(cb)} vs {sorted(bb)}")
    differing = {k for k in cb if k != "id" and cb[k] != bb[k]}
    if differing:
        raise Failed(f"the answers differ in {sorted(differing)}: {cb} vs {bb}")
    return sorted(set(ch) - set(bh))  # the fields only the service sends


def run(servers: dict[str, Server], sizes: Sizes, ids: Ids, token: str) -> dict[str, list[float]]:
    rps: dict[str, list[float]] = {side: [] for side in SIDES}

    async def main() -> None:
        for side in SIDES:  # warm-up: imports, pools, plans, both workers of each
            await load(servers[side].port, ids.take(side, sizes.warmup), token, sizes.connections)
        for r in range(sizes.rounds):
            order = SIDES if r % 4 in (0, 3) else SIDES[::-1]  # ABBA
            for side in order:
                batch = ids.take(side, sizes.requests)
                seconds = await load(servers[side].port, batch, token, sizes.connections)
                rps[side].append(len(batch) / seconds)
            print(
                f"  round {r + 1:2}: " + "  ".join(f"{s} {rps[s][-1]:7.1f} rps" for s in SIDES),
                flush=True,
            )

    asyncio.run(main())
    return rps


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer, shorter rounds (< 60 s)")
    parser.add_argument("--database", default="charter_bench_http")
    parser.add_argument("--connections", type=int, default=None)
    args = parser.parse_args()
    sizes = QUICK if args.quick else FULL
    if args.connections is not None:
        sizes = Sizes(args.connections, sizes.requests, sizes.rounds, sizes.warmup)
    url = _common.pg_bench_url(args.database)
    if url is None:
        print(json.dumps({"benchmark": "http", "skipped": "PostgreSQL unavailable"}))
        return 1
    per_side = sizes.warmup + sizes.rounds * sizes.requests + 10
    engine = make_engine(url)
    started = time.perf_counter()
    prepare(engine, 2 * per_side)
    bob = DEMO_USERS[(TENANT, APPROVER)]
    token = TokenSigner([TOKEN_SECRET]).issue(bob.id, bob.tenant, scopes=demo_scopes(bob))
    ids = Ids(per_side)
    print(f"machine: {_common.machine()}  load: {_common.loadavg()}")
    print(
        f"POST /invoices/{{id}}/approve, uvicorn --workers {WORKERS}, PostgreSQL; "
        f"{sizes.connections} connections, {sizes.requests} requests per side and round, "
        f"{sizes.rounds} rounds (ABBA) after {sizes.warmup} warm-up requests per side"
    )
    with serving(url) as servers:
        extra = asyncio.run(compare_answers(servers, ids, token))
        print(f"same JSON answer on both sides; headers only the service adds: {extra}")
        rps = run(servers, sizes, ids, token)
    sent = sum(ids.next[s] - 1 - i * per_side for i, s in enumerate(SIDES))
    approved, audited = counts(engine)
    engine.dispose()
    if approved != sent or audited != sent:
        print(f"MISMATCH: {sent} requests, {approved} approved, {audited} audit rows")
        return 1
    med = {side: statistics.median(v) for side, v in rps.items()}
    ratio = med["charter"] / med["bare"]
    round_ratio = statistics.median(c / b for c, b in zip(rps["charter"], rps["bare"], strict=True))
    print(f"{sent} requests, each 200; {approved} invoices approved, {audited} audit rows")
    print(
        f"median rps: charter {med['charter']:.1f}, bare {med['bare']:.1f}; "
        f"ratio {ratio:.3f} (target >= 0.65); median of per-round ratios {round_ratio:.3f}"
    )
    print(f"elapsed {time.perf_counter() - started:.1f} s, load {_common.loadavg()}")
    result = {
        "benchmark": "http",
        "quick": args.quick,
        "workers": WORKERS,
        "connections": sizes.connections,
        "requests_per_round": sizes.requests,
        "rounds": sizes.rounds,
        "charter_rps": round(med["charter"], 1),
        "bare_rps": round(med["bare"], 1),
        "ratio": round(ratio, 3),
        "round_ratio": round(round_ratio, 3),
        "target_ratio": 0.65,
        "met": ratio >= 0.65,
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
