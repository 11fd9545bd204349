"""Rate limits per (tenant, actor, rate class): one suite over the in-process and Redis stores."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import redis
from sqlalchemy import select

from charter import Actor, Charter
from charter.audit.entry import AuditEntry, audit_table
from charter.errors import CharterError, RateLimited, RateLimitUnavailable
from charter.ratelimit import (
    FAIL_OPEN,
    SUMMARY,
    DenialLog,
    RateClass,
    RateLimiter,
    default_class_of,
)

from . import app as test_app
from .conftest import AUDIT_KEYS, REDIS_URL, require_redis

START = datetime(2026, 1, 1, 12, 0, 10, tzinfo=UTC)  # 10 s into a minute window
CLASSES = [
    RateClass("write", "3/minute"),
    RateClass("read", "5/minute"),
    RateClass("financial", "2/minute", fail="closed"),
    RateClass("slow", "100/minute", concurrency=1, concurrency_ttl=timedelta(seconds=30)),
]


class Clock:
    def __init__(self) -> None:
        self.now = START

    def __call__(self) -> datetime:
        return self.now


def _flush_redis() -> None:
    client = redis.Redis.from_url(REDIS_URL)
    try:
        client.flushdb()  # only this suite's database number (CHARTER_REDIS_URL)
    finally:
        client.close()


@pytest.fixture(params=["memory", "redis"])
def store(request: pytest.FixtureRequest) -> str:
    if request.param == "memory":
        return "memory://"
    url = require_redis()
    _flush_redis()
    return url


@pytest.fixture
def closing() -> Iterator[Callable[[RateLimiter], RateLimiter]]:
    """``closing(RateLimiter(...))``: closed at teardown (its Redis connections with it)."""
    made: list[RateLimiter] = []
    yield lambda limiter: made.append(limiter) or limiter
    for limiter in made:
        limiter.close()


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def limited(database_url: str, store: str, clock: Clock) -> Iterator[Callable[..., Charter]]:
    """A Charter on SQLite or PostgreSQL whose rate limits count in ``store``."""
    made: list[Charter] = []

    def make(limiter: RateLimiter | None = None) -> Charter:
        limiter = limiter or RateLimiter(store, classes=CLASSES)
        charter = test_app.build(
            Charter(
                database_url=database_url, audit_keys=AUDIT_KEYS, clock=clock,
                rate_limits=limiter,
            )
        )  # fmt: skip
        made.append(charter)
        return charter

    yield make
    for charter in made:
        charter.close()


def create(charter: Charter, actor: Actor) -> Any:
    return charter.execute(actor, "doc.create", {"title": "t"})


def entries(charter: Charter, outcome: str) -> list[Any]:
    with charter.engine.connect() as conn:
        return list(conn.execute(select(audit_table).where(audit_table.c.outcome == outcome)))


def test_a_window_fills_up_and_each_call_says_what_is_left(limited, alice, clock):
    charter = limited()
    seen = [create(charter, alice).rate_limit[0] for _ in range(3)]
    assert [2, 1, 0] == [s.remaining for s in seen]
    assert {50} == {s.reset for s in seen}  # the window resets on the minute
    with pytest.raises(RateLimited) as refused:
        create(charter, alice)
    headers = refused.value.headers
    assert "50" == headers["Retry-After"]
    assert '"write";q=3;w=60' == headers["RateLimit-Policy"]
    assert '"write";r=0;t=50' == headers["RateLimit"]
    assert (429, "rate_limited") == (refused.value.status, refused.value.code)
    clock.now = START + timedelta(seconds=50)  # the next window
    assert 2 == create(charter, alice).rate_limit[0].remaining


def test_limits_are_per_tenant_actor_and_class(limited, alice, eve):
    charter = limited()
    doc = create(charter, alice).resource_id
    for _ in range(2):
        create(charter, alice)
    with pytest.raises(RateLimited):
        create(charter, alice)
    assert 2 == create(charter, eve).rate_limit[0].remaining  # another actor
    namesake = Actor.make("alice", "globex", roles={"member"})  # same id, another tenant
    assert 2 == create(charter, namesake).rate_limit[0].remaining
    read = charter.execute(alice, "doc.read", target=doc)  # another class, counted apart
    assert ("read", 4) == (read.rate_limit[0].policy, read.rate_limit[0].remaining)


def test_the_limit_is_checked_before_the_input_is_read(limited, alice):
    charter = limited()
    assert "rate_limit" == charter.pipeline_of("doc.create").names[0]
    for _ in range(3):
        create(charter, alice)
    with pytest.raises(RateLimited):  # not invalid_input: refused before any work
        charter.execute(alice, "doc.create", {"nonsense": True})


def test_denials_are_audited_aggregated_first_at_once_the_rest_as_one_summary(
    limited, alice, clock
):
    charter = limited()
    for _ in range(3):
        create(charter, alice)
    for _ in range(10):
        with pytest.raises(RateLimited):
            create(charter, alice)
    first = entries(charter, "rate_limited")
    assert 1 == len(first)
    assert ("alice", "doc.create", "deny") == (first[0].subject, first[0].action, first[0].decision)
    assert "write" == first[0].detail["rate_class"]
    assert 0 == charter.rate_limiter.denials.flush(START + timedelta(seconds=49))  # still open
    assert 1 == charter.rate_limiter.denials.flush(START + timedelta(seconds=50))
    (summary,) = entries(charter, SUMMARY)
    assert 9 == summary.detail["denied"]
    assert charter.verify_audit().ok


def writers() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "charter-ratelimit-audit"]


def test_the_summary_writer_stops_with_the_engine_and_when_nothing_is_left(limited, alice, clock):
    charter = limited()
    before = len(writers())
    for _ in range(3):
        create(charter, alice)
    for _ in range(2):
        with pytest.raises(RateLimited):
            create(charter, alice)
    assert before + 1 == len(writers())  # denied: a writer for the window's summary
    charter.engine.dispose()  # stops it, writing nothing (the engine is not reopened)
    assert before == len(writers())
    assert 1 == charter.rate_limiter.denials.pending  # still counted
    clock.now = START + timedelta(seconds=50)  # the window has closed
    for _ in range(3):  # a new window: 3 more calls, then a denial restarts the writer
        create(charter, alice)
    with pytest.raises(RateLimited):
        create(charter, alice)
    assert before + 1 == len(writers())
    charter.rate_limiter.denials.interval = 0.01
    for _ in range(200):  # the next round writes the closed window's summary
        if entries(charter, SUMMARY):
            break
        threading.Event().wait(0.01)
    assert [1] == [e.detail["denied"] for e in entries(charter, SUMMARY)]  # the first is its own


def test_two_processes_sharing_redis_share_one_count_and_one_first_denial(tmp_path, clock, alice):
    url = require_redis()
    _flush_redis()
    from charter.migrate import upgrade
    from charter.storage import make_engine

    db = f"sqlite:///{tmp_path / 'shared.db'}"
    engine = make_engine(db)
    upgrade(engine)
    test_app.Base.metadata.create_all(engine)
    engine.dispose()
    charters = [
        test_app.build(
            Charter(
                database_url=db,
                audit_keys=AUDIT_KEYS,
                clock=clock,
                rate_limits=RateLimiter(url, classes=CLASSES),
            )
        )
        for _ in range(2)
    ]
    try:
        passed = refused = 0
        for i in range(8):
            try:
                create(charters[i % 2], alice)
                passed += 1
            except RateLimited:
                refused += 1
        assert (3, 5) == (passed, refused)
        assert 1 == len(entries(charters[0], "rate_limited"))  # one first denial in all
    finally:
        for charter in charters:
            charter.close()
    assert 2 == len(entries(charters[0], SUMMARY))  # each process summarises its own


def test_a_concurrency_class_allows_n_in_flight_and_frees_the_slot_when_the_call_fails(
    limited, alice
):
    charter = limited()
    inside, leave = threading.Event(), threading.Event()

    @charter.action("doc.crunch", rate="slow", allow=test_app.is_member)
    def crunch(ctx: Any, _: None, data: Any) -> dict[str, str]:
        inside.set()
        leave.wait(10)
        raise RuntimeError("the export crashed")

    def first() -> None:
        with pytest.raises(Exception):  # noqa: PT011 - it crashes (a 500), slot held till then
            charter.execute(alice, "doc.crunch")

    worker = threading.Thread(target=first)
    worker.start()
    assert inside.wait(10)
    with pytest.raises(RateLimited) as refused:
        charter.execute(alice, "doc.crunch")
    assert (
        '"slow-concurrency";q=1;qu="concurrent-requests"'
        == refused.value.headers["RateLimit-Policy"]
    )
    leave.set()
    worker.join(10)
    with pytest.raises(Exception) as failed:  # noqa: PT011  # the slot was given back: it runs (and fails)
        charter.execute(alice, "doc.crunch")
    assert "internal_error" == getattr(failed.value, "code", None)


def test_a_slot_whose_worker_died_frees_at_its_expiry(store, clock, closing):
    limiter = closing(RateLimiter(store, classes=CLASSES))
    slow = limiter.rate_class("slow")
    who = RateLimiter.who("acme", "alice")
    limiter.acquire(slow, who, clock.now)  # never released: the worker died
    with pytest.raises(RateLimited):
        limiter.acquire(slow, who, clock.now + timedelta(seconds=29))
    _, release = limiter.acquire(slow, who, clock.now + timedelta(seconds=31))
    release()


def test_every_action_has_a_class_exports_and_financial_ones_stricter_than_reads():
    charter = test_app.build(
        Charter(database_url="sqlite://", development=True, rate_limits="memory://")
    )
    assert "write" == default_class_of(charter.spec("doc.create"))
    assert "read" == default_class_of(charter.spec("doc.read"))

    @charter.action("doc.export")
    def export(ctx: Any, _: None, data: Any) -> None:
        return None

    assert "export" == default_class_of(charter.spec("doc.export"))
    limiter = charter.rate_limiter
    assert limiter is not None
    read, export_, financial = (limiter.rate_class(n) for n in ("read", "export", "financial"))
    assert export_.amount < financial.amount < read.amount
    assert ("closed", "closed", "open") == (export_.fail, financial.fail, read.fail)
    assert export_.concurrency is not None
    assert all(charter.pipeline_of(a).names[0] == "rate_limit" for a in charter.actions)
    charter.close()


def test_rate_limits_are_on_by_default_and_off_only_when_the_code_says_so():
    charter = test_app.build(Charter(database_url="sqlite://", development=True))
    assert all(charter.pipeline_of(a).names[0] == "rate_limit" for a in charter.actions)
    assert charter.rate_limiter is not None
    assert not charter.rate_limiter.counters.shared  # counted in this process
    charter.close()
    charter = test_app.build(Charter(database_url="sqlite://", development=True, rate_limits=None))
    assert not any("rate_limit" in charter.pipeline_of(a).names for a in charter.actions)
    charter.close()


def test_an_unknown_rate_class_fails_at_declaration():
    from charter.errors import ConfigurationError

    charter = Charter(database_url="sqlite://", development=True, rate_limits="memory://")
    with pytest.raises(ConfigurationError, match="no rate class named 'bulk'"):

        @charter.action("thing.run", rate="bulk")
        def run(ctx: Any, _: None, data: Any) -> None:
            return None

    with pytest.raises(ConfigurationError, match="rate="):

        @charter.action("thing.walk", rate="Not A Class")
        def walk(ctx: Any, _: None, data: Any) -> None:
            return None

    charter.close()


@pytest.mark.parametrize(
    ("limit", "concurrency", "message"),
    [
        ("1000000000000000/second", None, "at most 999_999_999_999_999 calls per window"),
        ("1/1000 years", None, "the window must be from 1 second to 100 years"),
        ("10/second", 10**15, "concurrency must be from 1 to 999_999_999_999_999"),
    ],
)
def test_a_class_the_ratelimit_fields_cannot_state_fails_at_declaration(
    limit, concurrency, message
):
    """RFC 9651: a structured field's integer has at most 15 digits."""
    from charter.errors import ConfigurationError

    with pytest.raises(ConfigurationError, match=message):
        RateClass("big", limit, concurrency=concurrency)
    largest = RateClass("big", "999999999999999/second", concurrency=999_999_999_999_999)
    assert (999_999_999_999_999, 1) == (largest.amount, largest.window)


# -- Redis unreachable ---------------------------------------------------------------------

DOWN = "redis://127.0.0.1:1/0"  # nothing listens on port 1


def test_redis_down_a_fail_closed_class_answers_503_with_retry_after(limited, alice):
    charter = limited(RateLimiter(DOWN, classes=CLASSES))

    @charter.action("doc.pay", rate="financial", allow=test_app.is_member)
    def pay(ctx: Any, _: None, data: Any) -> None:
        return None

    with pytest.raises(RateLimitUnavailable) as refused:
        charter.execute(alice, "doc.pay")
    assert (503, "rate_limit_unavailable") == (refused.value.status, refused.value.code)
    assert "2" == refused.value.headers["Retry-After"]


def test_redis_down_a_fail_open_class_counts_here_and_writes_one_audited_warning(limited, alice):
    charter = limited(RateLimiter(DOWN, classes=CLASSES))
    for _ in range(3):
        create(charter, alice)
    with pytest.raises(RateLimited):  # still limited, in this process
        create(charter, alice)
    (warning,) = entries(charter, FAIL_OPEN)
    assert ("charter.rate_limit", "write") == (warning.action, warning.detail["rate_class"])
    assert "127.0.0.1:1" in warning.detail["store"]


def test_a_store_uri_with_a_password_is_never_shown(closing):
    limiter = closing(RateLimiter("redis://:hunter2-secret@127.0.0.1:1/0"))
    assert "hunter2" not in repr(limiter)


# -- races: exactly K of N concurrent callers pass -------------------------------------------


def _hammer(url: str, calls: int, start: Any) -> int:
    """One worker process: ``calls`` checks of one actor in one window; how many passed."""
    limiter = RateLimiter(url, classes=[RateClass("write", "50/minute")])
    cls, who = limiter.rate_class("write"), RateLimiter.who("acme", "alice")
    start.wait()
    passed = 0
    for _ in range(calls):
        try:
            limiter.check(cls, who, START)
            passed += 1
        except RateLimited:
            pass
    limiter.close()
    return passed


def test_200_concurrent_threads_against_a_limit_of_50_exactly_50_pass(store, closing):
    limiter = closing(RateLimiter(store, classes=[RateClass("write", "50/minute")]))
    cls, who = limiter.rate_class("write"), RateLimiter.who("acme", "alice")
    barrier = threading.Barrier(200)
    passed: list[bool] = []

    def worker() -> None:
        barrier.wait()
        try:
            limiter.check(cls, who, START)
            passed.append(True)
        except RateLimited:
            passed.append(False)

    threads = [threading.Thread(target=worker) for _ in range(200)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert (50, 150) == (passed.count(True), passed.count(False))


def test_8_processes_sharing_redis_against_a_limit_of_50_exactly_50_pass():
    import multiprocessing

    url = require_redis()
    _flush_redis()
    context = multiprocessing.get_context("spawn")
    with context.Manager() as manager:
        start = manager.Event()
        with context.Pool(8) as pool:
            results = [pool.apply_async(_hammer, (url, 25, start)) for _ in range(8)]
            start.set()
            passed = [r.get(timeout=60) for r in results]
    assert 50 == sum(passed)


def test_100_concurrent_threads_against_3_in_flight_slots_exactly_3_take_one(store, closing):
    limiter = closing(RateLimiter(store, classes=[RateClass("slow", "1000/minute", concurrency=3)]))
    slow, who = limiter.rate_class("slow"), RateLimiter.who("acme", "alice")
    barrier = threading.Barrier(100)
    taken: list[bool] = []

    def worker() -> None:
        barrier.wait()
        try:
            limiter.acquire(slow, who, START)  # never released: each slot stays taken
            taken.append(True)
        except RateLimited:
            taken.append(False)

    threads = [threading.Thread(target=worker) for _ in range(100)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert (3, 97) == (taken.count(True), taken.count(False))


def test_the_in_process_store_counts_per_window_and_forgets_expired_keys():
    from charter.ratelimit.store import WindowCounts

    threads = threading.active_count()
    now = [100.0]
    counts = WindowCounts(clock=lambda: now[0])
    assert [1, 2, 3] == [counts.incr("w1", 60) for _ in range(3)]
    assert 3 == counts.get("w1")
    now[0] += 61  # the window expired: a key read again starts from zero
    assert 0 == counts.get("w1")
    assert 1 == counts.incr("w1", 60)
    for i in range(WindowCounts.SWEEP_EVERY):  # keys of windows long gone are swept
        counts.incr(f"old{i}", 1)
    now[0] += 2
    for _ in range(WindowCounts.SWEEP_EVERY):
        counts.incr("live", 60)
    assert len(counts._counts) <= 3  # only the live windows' keys are left
    assert threads == threading.active_count()  # and counting started no thread


# -- Redis with PostgreSQL: the count's round trip overlaps the call's own work -------------

#: The ``limited`` fixture on PostgreSQL and Redis only: the pipelines that overlap the count.
PG_AND_REDIS = pytest.mark.parametrize(
    ("database_url", "store"),
    [pytest.param("postgres", "redis", marks=pytest.mark.postgres)],
    indirect=True,
)


def _redis_count(prefix: str) -> int:
    client = redis.Redis.from_url(REDIS_URL)
    try:
        return sum(int(client.get(k) or 0) for k in client.keys(f"charter-rl:{prefix}/*"))
    finally:
        client.close()


@PG_AND_REDIS
def test_on_redis_and_postgres_the_count_is_read_before_the_first_statement(limited, alice):
    charter = limited()
    names = charter.pipeline_of("doc.create").names
    assert ("rate_limit", "validate") == names[:2]
    reply = names.index("rate_limit_reply")
    assert names[reply - 1] in {"validate", "replay"}  # the last prepare stage: nothing sent yet
    assert charter.pipeline_of("doc.create").transaction[0].name == "rate_limit_reply"
    # A concurrency class waits for its slot: its pipeline does not overlap.
    slow = limited(RateLimiter(REDIS_URL, classes=CLASSES))

    @slow.action("doc.slow", rate="slow", allow=test_app.is_member)
    def run_slow(ctx: Any, _: None, data: Any) -> None:
        return None

    assert "rate_limit_reply" not in slow.pipeline_of("doc.slow").names


@PG_AND_REDIS
def test_on_redis_and_postgres_the_count_overlaps_begin_and_a_flood_reaches_no_connection(
    limited, alice
):
    """The count is sent at the transaction's start and read after its BEGIN, before the first
    statement; a refused call reaches no statement. Once this process has seen the actor reach
    the limit, their next calls are refused before a connection is taken."""
    from psycopg import pq
    from sqlalchemy import event

    charter = limited()
    seen: list[str] = []
    status_at_first_statement: list[Any] = []

    def statement(conn: Any, cursor: Any, text: str, *_: Any) -> None:
        if not status_at_first_statement:
            pgconn = conn.connection.driver_connection.pgconn
            status_at_first_statement.append(pgconn.transaction_status)
        seen.append(text.split()[0])

    event.listen(charter.engine, "before_cursor_execute", statement)
    event.listen(charter.engine.pool, "checkout", lambda *_: seen.append("checkout"))
    for n in range(3):  # the class allows 3 a minute
        charter.execute(alice, "doc.create", {"title": f"t{n}"})
    assert [pq.TransactionStatus.INTRANS] == status_at_first_statement  # BEGIN already sent
    limiter = charter.rate_limiter
    assert limiter is not None
    write, who = limiter.rate_class("write"), RateLimiter.who("acme", "alice")
    assert limiter.at_limit(write, who, charter.clock())  # the third count reached it
    seen.clear()
    with pytest.raises(RateLimited):  # refused before its session: only the denial's entry
        charter.execute(alice, "doc.create", {"title": "over"})
    assert ["checkout", "INSERT"] == seen  # the window's first denial, audited at once
    seen.clear()
    with pytest.raises(RateLimited):  # later denials are summarised: nothing reaches the database
        charter.execute(alice, "doc.create", {"title": "over again"})
    assert [] == seen


@PG_AND_REDIS
def test_on_redis_and_postgres_a_call_that_never_begins_is_still_counted(limited, alice):
    """An invalid input never reaches the transaction: its deferred count is sent and read when
    the runner settles the call, and over the limit the 429 wins over the 422."""
    charter = limited()
    for _ in range(3):
        with pytest.raises(CharterError) as invalid:
            charter.execute(alice, "doc.create", {"title": 5})
        assert 422 == invalid.value.status
    assert 3 == _redis_count("write")
    other = limited()  # a second worker: has not seen the limit reached
    with pytest.raises(RateLimited):
        other.execute(alice, "doc.create", {"title": 5})


def test_settling_sends_what_a_stage_deferred_then_reads_it():
    from charter.pipeline.call import Call

    order: list[str] = []

    def send() -> Callable[[], None]:
        order.append("sent")
        return lambda: order.append("read")

    call = Call(spec=None, ctx=None)  # type: ignore[arg-type]  # settle reads neither
    call.unsent = (send,)
    call.settle()
    assert ["sent", "read"] == order
    call.settle()  # nothing left to send or read
    assert ["sent", "read"] == order


def test_sqlite_and_the_in_process_store_read_the_count_at_once(closing):
    for url, storage in (("sqlite://", require_redis()), ("sqlite://", "memory://")):
        limiter = closing(RateLimiter(storage, classes=CLASSES))
        charter = test_app.build(Charter(database_url=url, development=True, rate_limits=limiter))
        assert "rate_limit_reply" not in charter.pipeline_of("doc.create").names
        charter.close()


@pytest.mark.redis
@pytest.mark.parametrize("key", ["write/acme:bob/29441234", "read/tenant ünï:çødé/1", "x"])
def test_a_count_is_sent_as_the_bytes_redis_py_would_pack(key):
    """Counters packs its commands itself (14 µs a count less): the same bytes as redis-py's,
    INCRBY with EXPIRE … NX, and the script for a server without NX."""
    from charter.ratelimit.store import Counters

    counters = Counters(require_redis())
    connection = counters._held.take()
    try:
        name = counters._prefix + key
        pair = connection.pack_commands([("INCRBY", name, 1), ("EXPIRE", name, 61, "NX")])
        assert b"".join(pair) == counters._packed(connection, name, 61)
        script = connection.pack_command("EVALSHA", counters._incr.sha, 1, name, 61, 1)
        assert b"".join(script) == counters._packed(connection, name, 61, nx=False)
    finally:
        counters._held.give(connection)
        counters.close()


@pytest.mark.redis
def test_a_count_sets_its_windows_expiry_once_and_counts_on_without_resetting_it():
    from charter.ratelimit.store import Counters

    counters = Counters(require_redis())
    client = redis.Redis.from_url(REDIS_URL)
    key = f"test-expiry/{uuid.uuid4().hex}/1"
    try:
        assert [1, 2] == [counters.hit(key, 61), counters.hit(key, 61)]
        client.expire(counters._prefix + key, 30)  # a later count must not move it back
        assert 3 == counters.hit(key, 61)
        assert 0 < client.ttl(counters._prefix + key) <= 30
        assert 3 == counters.peek(key)  # limits' own get reads the same key
        assert counters.expire_nx
    finally:
        client.delete(counters._prefix + key)
        client.close()
        counters.close()


@pytest.mark.redis
def test_a_server_without_expire_nx_gets_its_expiry_set_and_the_script_from_then_on(
    monkeypatch, caplog
):
    """Before Redis 7.0, EXPIRE refuses NX (after INCRBY counted): simulated here by an option
    no server knows. The count stands, the key still expires, and later counts use the script."""
    from charter.ratelimit import store

    counters = store.Counters(require_redis())
    client = redis.Redis.from_url(REDIS_URL)
    key = f"test-old-redis/{uuid.uuid4().hex}/1"
    real = counters._packed

    def old_server(connection: Any, name: str, expiry: int, *, nx: bool = True) -> bytes:
        return real(connection, name, expiry, nx=nx).replace(b"$2\r\nNX", b"$2\r\nQQ")

    monkeypatch.setattr(counters, "_packed", old_server)
    try:
        with caplog.at_level("WARNING", logger="charter.ratelimit"):
            assert 1 == counters.hit(key, 61)
        assert not counters.expire_nx
        assert "no EXPIRE … NX" in caplog.text
        assert 0 < client.ttl(counters._prefix + key) <= 61  # set by the plain EXPIRE
        assert [2, 3] == [counters.hit(key, 61), counters.hit_later(key, 61)()]  # the script
        assert 0 < client.ttl(counters._prefix + key) <= 61
        assert [] == [c for c in counters._held._idle if c._sock is None]  # none dropped
    finally:
        client.delete(counters._prefix + key)
        client.close()
        counters.close()


@pytest.mark.redis
def test_a_count_in_flight_when_the_store_closes_closes_its_connection():
    """close() closes the idle connections at once and a held one when its reply is read:
    none is left open for the garbage collector (a ResourceWarning, under this suite an error)."""
    from charter.ratelimit.store import Counters

    counters = Counters(require_redis())
    try:
        read = counters.hit_later("test-close/1", 60)  # sent; its connection is held
        idle = counters.hit_later("test-close/2", 60)
        idle()  # read: its connection is idle
        held = counters._held
        counters.close()
        assert [] == held._idle
        assert 1 == read()  # the reply is still read ...
        assert [] == held._idle  # ... and the connection closed, not kept
        assert 0 == held._out
        assert 2 == counters.hit_later("test-close/2", 60)()  # a later count reconnects
    finally:
        counters.close()


@PG_AND_REDIS
def test_over_the_limit_the_429_wins_over_invalid_input_and_a_cached_replay(limited, alice):
    charter = limited()
    doc = create(charter, alice).resource_id
    first = charter.execute(alice, "doc.charge", {"amount": "1"}, target=doc, key="k-1")
    again = charter.execute(alice, "doc.charge", {"amount": "1"}, target=doc, key="k-1")
    assert again.replayed
    assert again.body == first.body
    with pytest.raises(RateLimited):  # answered from the cache, but over the limit: refused
        charter.execute(alice, "doc.charge", {"amount": "1"}, target=doc, key="k-1")
    with pytest.raises(RateLimited):  # not invalid_input: the count was sent first
        charter.execute(alice, "doc.create", {"nonsense": True})
    assert 5 == _redis_count("write")  # every call counted once, the refused ones too


@PG_AND_REDIS
def test_every_way_a_call_ends_gives_its_connection_back(limited, alice, monkeypatch):
    """With one connection per process, a single leaked one would make the next call wait 1 s
    for it and fall back to counting here (an audited fail-open warning): none does."""
    from charter.errors import Forbidden, HandlerFailed, InvalidInput
    from charter.ratelimit import store as counters

    monkeypatch.setattr(counters, "REDIS_CONNECTIONS", 1)
    charter = limited(RateLimiter(REDIS_URL, classes=[RateClass("write", "100/minute")]))
    doc = create(charter, alice).resource_id
    with pytest.raises(InvalidInput):
        charter.execute(alice, "doc.create", {"nonsense": True})
    with pytest.raises(Forbidden):
        charter.execute(alice, "doc.nothing", target=doc)  # no rule: denied, audited
    with pytest.raises(HandlerFailed):
        charter.execute(alice, "doc.explode", target=doc)
    charter.execute(alice, "doc.charge", {"amount": "1"}, target=doc, key="k-2")
    charter.execute(alice, "doc.charge", {"amount": "1"}, target=doc, key="k-2")  # replay
    started = time.monotonic()
    assert 93 == create(charter, alice).rate_limit[0].remaining
    assert time.monotonic() - started < 0.5
    assert [] == entries(charter, FAIL_OPEN)
    assert 7 == _redis_count("write")


@PG_AND_REDIS
def test_a_batch_reads_each_items_count_before_sending_the_next(
    database_url, store, alice, monkeypatch
):
    from charter.ratelimit import store as counters

    from . import bulk_app

    monkeypatch.setattr(counters, "REDIS_CONNECTIONS", 1)
    limiter = RateLimiter(REDIS_URL, classes=[RateClass("write", "1000/minute")])
    bulk = bulk_app.build(database_url, rate_limits=limiter)
    try:
        assert "rate_limit_reply" in bulk.pipeline_of("doc.tick").names
        ids = [int(create(bulk, alice).resource_id) for _ in range(20)]
        started = time.monotonic()
        done = bulk.execute_many(alice, "doc.tick", ids)
        assert time.monotonic() - started < 5  # no item waited for a connection
        assert 20 == done.applied
        assert [] == entries(bulk, FAIL_OPEN)
        assert 40 == _redis_count("write")
    finally:
        bulk.close()


@PG_AND_REDIS
def test_scripts_lost_by_the_store_are_sent_again(limited, alice):
    charter = limited()
    create(charter, alice)
    client = redis.Redis.from_url(REDIS_URL)
    try:
        client.script_flush()  # as after a Redis restart: EVALSHA answers NOSCRIPT
    finally:
        client.close()
    assert 1 == create(charter, alice).rate_limit[0].remaining
    assert 0 == create(charter, alice).rate_limit[0].remaining


@PG_AND_REDIS
def test_a_reply_that_never_comes_fails_by_the_class_mode_and_the_store_recovers(limited, alice):
    charter = limited(RateLimiter(REDIS_URL, classes=CLASSES, retry_after=1))

    @charter.action("doc.pay", rate="financial", allow=test_app.is_member)
    def pay(ctx: Any, _: None, data: Any) -> None:
        return None

    assert "rate_limit_reply" in charter.pipeline_of("doc.pay").names
    client = redis.Redis.from_url(REDIS_URL)
    try:
        client.client_pause(1500, all=False)  # writes wait 1.5 s: the count's read times out
        with pytest.raises(RateLimitUnavailable):  # the class fails closed
            charter.execute(alice, "doc.pay")
    finally:
        client.client_unpause()
        client.close()
    time.sleep(1.1)  # the store is left alone for retry_after, then tried again
    # The timed-out connection was closed, never reused (Redis drops a gone client's command).
    assert 1 == charter.execute(alice, "doc.pay").rate_limit[0].remaining


def test_settling_reads_every_pending_reply_and_raises_the_first_refusal():
    from charter.pipeline.call import Call

    read: list[str] = []

    def refused() -> None:
        read.append("first")
        raise RateLimited("over", rate_class="write", retry_after=1)

    call = Call(spec=None, ctx=None)  # type: ignore[arg-type]  # settle reads neither
    call.pending = (refused, lambda: read.append("second"))
    with pytest.raises(RateLimited):
        call.settle()
    assert ["first", "second"] == read  # the second still read: its connection goes back
    call.settle()  # settled once: nothing left to read
    assert ["first", "second"] == read


# -- exports: counted like calls, outside the runner ----------------------------------------


def _exporting(charter: Charter) -> Charter:
    """``doc.export_all``, of class ``financial`` (2/minute, fail closed, no concurrency)."""
    from charter.policy import A

    @charter.action(
        "doc.export_all", on=test_app.Doc, target=None, listable=True, rate="financial",
        allow=A.has_role("member"), sensitive_read=True,
    )  # fmt: skip
    def export_all(ctx: Any, _: None, data: Any) -> None:
        return None

    return charter


def _export(charter: Charter, actor: Actor, **options: Any) -> Any:
    with charter.export(actor, "doc.export_all", **options) as stream:
        for _ in stream:
            pass
    return stream


@PG_AND_REDIS
def test_an_export_of_a_class_without_concurrency_is_counted_and_gives_its_connection_back(
    limited, alice, monkeypatch
):
    """Its count is sent without waiting (the class has no slot): the export reads it before
    any work, so over the limit it is a 429, and its connection goes back every time."""
    from charter.errors import InvalidPage
    from charter.ratelimit import store as counters

    monkeypatch.setattr(counters, "REDIS_CONNECTIONS", 1)
    charter = _exporting(limited())
    assert "rate_limit_reply" in charter.pipeline_of("doc.export_all").names  # overlapped
    with pytest.raises(InvalidPage):  # counted, then refused: its reply still read
        charter.export(alice, "doc.export_all", fields=["nonsense"])
    started = time.monotonic()
    stream = _export(charter, alice)
    assert time.monotonic() - started < 0.5  # no wait for a connection left out
    assert ("financial", 0) == (stream.rate_limit[0].policy, stream.rate_limit[0].remaining)
    with pytest.raises(RateLimited) as refused:
        _export(charter, alice)
    assert '"financial";r=0;t=50' == refused.value.headers["RateLimit"]
    assert 1 == len(entries(charter, "export_started"))  # the refused one did no work
    assert 1 == len(entries(charter, "rate_limited"))
    assert 0 == charter.rate_limiter.counters._held._out
    assert 3 == _redis_count("financial")


# -- denials in the audit trail --------------------------------------------------------------


def test_a_first_denial_by_a_check_that_does_not_count_is_audited_at_once(store, clock, closing):
    """A request with a credential is checked against its address's count without adding to
    it (``peek``): refused on the limit, it is the window's first denial, written at once."""
    limiter = closing(RateLimiter(store, classes=[RateClass("anonymous", "3/minute")]))
    written: list[AuditEntry] = []
    limiter.denials.bind(written.append, clock)
    cls, who = limiter.rate_class("anonymous"), RateLimiter.who(None, uuid.uuid4().hex)

    def audit(detail: dict[str, object]) -> AuditEntry:
        return AuditEntry(
            at=clock.now, subject="address:203.0.113.9", subject_kind="anonymous", channel="http",
            action="http.unauthenticated", decision="deny", outcome="rate_limited", detail=detail,
        )  # fmt: skip

    for _ in range(3):
        limiter.check(cls, who, clock.now, audit)
    with pytest.raises(RateLimited):
        limiter.peek(cls, who, clock.now, audit)
    assert ["rate_limited"] == [e.outcome for e in written]  # at once
    with pytest.raises(RateLimited):  # counted: the limit plus one, after the peek's first
        limiter.check(cls, who, clock.now, audit)
    with pytest.raises(RateLimited):
        limiter.peek(cls, who, clock.now, audit)
    assert 1 == len(written)  # the window's first was written: the rest are summarised
    assert 1 == limiter.denials.flush(everything=True)
    assert [("rate_limited", None), (SUMMARY, 2)] == [
        (e.outcome, (e.detail or {}).get("denied")) for e in written
    ]


EXITING = """
import sys
sys.path.insert(0, {root!r})
from datetime import UTC, datetime
from charter import Actor, Charter
from charter.errors import RateLimited
from charter.migrate import upgrade
from charter.ratelimit import RateClass, RateLimiter
from tests import app

limiter = RateLimiter("memory://", classes=[RateClass("write", "2/hour")])
charter = app.build(Charter(database_url={url!r}, audit_keys={keys!r}, rate_limits=limiter,
                            clock=lambda: datetime(2026, 1, 1, 12, tzinfo=UTC)))
upgrade(charter.engine)
app.Base.metadata.create_all(charter.engine)
alice = Actor.make("alice", "acme", roles={{"member"}})
for _ in range(6):
    try:
        charter.execute(alice, "doc.create", {{"title": "t"}})
    except RateLimited:
        pass
{after}
# No close(), and the window (an hour) is still open: leaving the interpreter writes its summary.
"""


def _exit_after(tmp_path: Any, after: str = "") -> tuple[Charter, Any]:
    import subprocess
    import sys
    from pathlib import Path

    url = f"sqlite:///{tmp_path / 'exiting.db'}"
    script = tmp_path / "job.py"
    root = str(Path(__file__).resolve().parents[1])
    script.write_text(EXITING.format(root=root, url=url, keys=AUDIT_KEYS, after=after))
    done = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=120, check=False
    )
    return Charter(database_url=url, audit_keys=AUDIT_KEYS), done


def test_a_process_that_exits_without_close_writes_its_open_windows_summaries(tmp_path):
    charter, done = _exit_after(tmp_path)
    try:
        assert 0 == done.returncode, done.stderr
        assert [None] == [e.detail.get("denied") for e in entries(charter, "rate_limited")]
        assert [3] == [e.detail["denied"] for e in entries(charter, SUMMARY)]
        assert charter.verify_audit().ok
    finally:
        charter.close()


def test_summaries_that_cannot_be_written_at_exit_are_logged_never_raised(tmp_path, clock):
    gone = "with charter.engine.begin() as c: c.exec_driver_sql('DROP TABLE charter_audit')"
    _, done = _exit_after(tmp_path, gone)  # the trail is gone before the process exits
    assert (0, 1) == (done.returncode, done.stderr.count("could not audit a rate limit denial"))
    assert "Exception ignored" not in done.stderr  # nothing raised out of the exit hook
    log = DenialLog(_broken, clock)
    log.denied("key", first=False, closes=clock.now, entry=lambda: _entry(clock))
    log._at_exit()  # what the hook calls: a foreign error is logged too
    assert 0 == log.pending


def _broken(entry: AuditEntry) -> None:
    raise RuntimeError("the database is gone")


def _entry(clock: Clock) -> AuditEntry:
    return AuditEntry(at=clock.now, subject="s", subject_kind="user", channel="http",
                      action="a", decision="deny", outcome="rate_limited")  # fmt: skip


def test_the_exit_hook_keeps_no_denial_log_alive(clock):
    import gc
    import weakref

    from charter.ratelimit.denials import PROCESS_HOOKS

    log = DenialLog(lambda entry: None, clock, interval=0.01)
    log.denied("key", first=True, closes=clock.now, entry=lambda: _entry(clock))
    assert log in PROCESS_HOOKS
    log.close()  # its writer thread ends
    gone = weakref.ref(log)
    del log
    gc.collect()
    assert gone() is None
