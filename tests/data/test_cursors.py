"""Page cursors: opaque, authenticated, bound to who asked what, expiring, with key rotation."""

from __future__ import annotations

import base64
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest

from charter.data.cursors import MAX_CURSOR, CursorBinding, CursorSealer
from charter.errors import ConfigurationError, InvalidCursor

KEY = {"k1": "cursor-key-0123456789abcdef"}
ALICE = CursorBinding("acme", "alice", "alice", "invoice.get", (("state", "draft"),), "-amount")


class Clock:
    def __init__(self) -> None:
        self.now = datetime(2026, 12, 1, 9, 0, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now


def sealer(clock: Clock | None = None, keys: dict[str, str] = KEY) -> CursorSealer:
    return CursorSealer(keys, clock=clock or Clock())


def test_a_cursor_round_trips_its_position_with_its_types() -> None:
    s = sealer()
    position = [Decimal("12.50"), 7]
    assert position == s.open(s.seal(ALICE, position), ALICE)
    when = datetime(2026, 1, 2, 3, 4, tzinfo=UTC)
    assert [when, "x"] == s.open(s.seal(ALICE, [when, "x"]), ALICE)


def test_a_cursor_is_not_readable() -> None:
    token = sealer().seal(ALICE, ["a-customer-name", 424242])
    raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
    for secret in (b"a-customer-name", b"424242", b"alice", b"acme", b'"k"'):
        assert secret not in raw


def test_every_flipped_bit_is_refused() -> None:
    s = sealer()
    raw = bytearray(base64.urlsafe_b64decode(s.seal(ALICE, [1]) + "=="))
    for index in range(len(raw)):
        for bit in (0, 7):
            tampered = bytearray(raw)
            tampered[index] ^= 1 << bit
            token = base64.urlsafe_b64encode(bytes(tampered)).rstrip(b"=").decode()
            with pytest.raises(InvalidCursor) as refused:
                s.open(token, ALICE)
            error = refused.value
            assert ("invalid_cursor", "invalid") == (error.code, error.attrs["reason"])


@pytest.mark.parametrize(
    "other",
    [
        CursorBinding("acme", "bob", "bob", "invoice.get", (("state", "draft"),), "-amount"),
        CursorBinding("globex", "alice", "alice", "invoice.get", (("state", "draft"),), "-amount"),
        CursorBinding("acme", "alice", "sam", "invoice.get", (("state", "draft"),), "-amount"),
        CursorBinding("acme", "alice", "alice", "invoice.pay", (("state", "draft"),), "-amount"),
        CursorBinding("acme", "alice", "alice", "invoice.get", (("state", "paid"),), "-amount"),
        CursorBinding("acme", "alice", "alice", "invoice.get", (), "-amount"),
        CursorBinding("acme", "alice", "alice", "invoice.get", (("state", "draft"),), "+amount"),
    ],
    ids=["actor", "tenant", "real-actor", "action", "filter", "no-filter", "sort"],
)
def test_a_cursor_opens_only_the_list_it_was_issued_for(other: CursorBinding) -> None:
    s = sealer()
    with pytest.raises(InvalidCursor):
        s.open(s.seal(ALICE, [1]), other)


def test_a_cursor_expires_after_its_ttl() -> None:
    clock = Clock()
    s = sealer(clock)
    token = s.seal(ALICE, [1])
    clock.now += timedelta(days=3) - timedelta(seconds=1)
    assert [1] == s.open(token, ALICE)
    clock.now += timedelta(seconds=1)
    with pytest.raises(InvalidCursor) as refused:
        s.open(token, ALICE)
    assert "expired" == refused.value.attrs["reason"]


def test_rotated_keys_still_open_older_cursors_until_dropped() -> None:
    old = sealer().seal(ALICE, [1])
    rotated = sealer(keys={"k2": "a-newer-cursor-key-0123456789", **KEY})
    assert [1] == rotated.open(old, ALICE)
    new = rotated.seal(ALICE, [2])
    with pytest.raises(InvalidCursor):
        sealer().open(new, ALICE)  # sealed with k2, which the old ring does not hold
    with pytest.raises(InvalidCursor):
        sealer(keys={"k2": "a-newer-cursor-key-0123456789"}).open(old, ALICE)


@pytest.mark.parametrize(
    "garbage", ["", "abc", "1", "!!!!", "A" * (MAX_CURSOR + 1), "é" * 10, 7, None, b"x", ["x"]]
)
def test_garbage_is_an_invalid_cursor(garbage: object) -> None:
    with pytest.raises(InvalidCursor):
        sealer().open(garbage, ALICE)


def test_short_keys_and_no_keys_are_refused_at_start_up() -> None:
    with pytest.raises(ConfigurationError):
        CursorSealer({})
    with pytest.raises(ConfigurationError):
        CursorSealer({"k": "short"})
    assert "cursor-key" not in repr(sealer())
