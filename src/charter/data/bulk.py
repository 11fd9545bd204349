"""Bulk actions: many items in one request, each through its action's whole pipeline.

A bulk endpoint that checks the request and then applies every item is an
IDOR at scale. Here the request is only a carrier: every item runs the stages a
single call of the action runs — rate limit, validation, the tenant-scoped
locked load of *its own* record, workflow, policy, charge, handler, audit — so
an item is allowed exactly when the same single call would be, and a foreign or
unknown id is refused exactly as a missing record is (same code, same message).

Two modes, declared per action (``bulk=`` on :meth:`Charter.action`), after
Google's batch methods (AIP-231/233/235):

* ``per_item`` — one transaction per item (the runner of :mod:`charter.pipeline.run`);
  each item gets its result (applied, refused with the single call's error, or
  replayed), and a partial success is stated;
* ``all_or_nothing`` — one transaction for the batch; every item runs in a
  SAVEPOINT so that a failing one is found and the rest still checked; any
  failure rolls everything back and raises :class:`~charter.data.batch.BatchFailed`
  listing every failing item with its position and reason. Before any item runs,
  the records of all items are locked in one deterministic order (table, then
  key, PostgreSQL): two overlapping batches wait for each other, they never deadlock.

Idempotency. One key for the request, fingerprinted over every item in order
(:func:`~charter.data.batch.batch_fingerprint`); a replay answers the whole
stored result, the same key with other items is 422 ``idempotency_key_reused``.
All-or-nothing claims the key inside the batch's transaction, as a single call
does. Per-item commits the batch's claim once an item has passed its rate-limit
count (so an actor over the limit writes no key), then runs item ``i`` under the
derived key ``<key>#<i>``, claimed in that item's own transaction: a batch cut
off by a crash and sent again replays the items that committed and runs the
rest, so each item is applied at most once.

Bounds. At most ``max_batch`` items (the action's, else the Charter's, 1,000 by
default: 413 ``batch_too_large``), at least one (400 ``batch_empty``), nothing
applied when refused. Each item counts against rate limits, quotas and credits
as its single call would.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel
from sqlalchemy import String, bindparam, select
from sqlalchemy import inspect as sa_inspect
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session

from ..actions import ActionSpec, BulkMode
from ..actor import Actor, Channel
from ..audit.entry import AuditEntry
from ..context import ActionContext
from ..errors import CharterError, Conflict, Forbidden, HandlerFailed, InvalidInput
from ..idempotency import claims
from ..idempotency.keys import (
    IdempotencyKeyInProgress,
    IdempotencyKeyInvalid,
    IdempotencyKeyMissing,
    IdempotencyKeyUnsupported,
    IdempotencyMode,
    fingerprint_key,
    item_key,
    validate_key,
)
from ..idempotency.store import (
    StoredOutcome,
    completion_params,
    lookup,
    outcome_table,
)
from ..pipeline.build import Pipeline
from ..pipeline.call import Call, Refusal, Stage
from ..pipeline.run import CLAIM_ATTEMPTS, contention, refusal_entry, run
from ..pipeline.runtime import Runtime
from ..pipeline.stages import check_reason
from ..pipeline.tenancy import SCOPED, TenantGuard
from ..pipeline.writes import Committer, finish
from ..policy import ActionPolicy
from ..policy.visibility import hidden_fields, redact
from ..resources import ResourceSpec
from ..storage import translate_errors
from .batch import (
    MAX_BATCH_KEY,
    BatchEmpty,
    BatchFailed,
    BatchItem,
    BatchOutcome,
    BatchTooLarge,
    BulkUnsupported,
    batch_fingerprint,
    item_fingerprint,
    split_item,
)

__all__ = ["DEFAULT_MAX_BATCH", "BatchRequest", "Bulk"]

DEFAULT_MAX_BATCH = 1000
#: Keys per locking statement (SQLite and drivers bound the parameters of one statement).
_LOCK_CHUNK = 500
#: The stages an all-or-nothing item skips: the batch claims its key and commits once.
_BATCH_OWN = frozenset({"replay", "commit"})


@dataclass(frozen=True, slots=True)
class BatchRequest:
    """One bulk request: who asks, for which action, with which items, under which key."""

    spec: ActionSpec
    pipeline: Pipeline
    policy: ActionPolicy
    actor: Actor
    items: Sequence[Any]
    key: str | None
    reason: str | None
    channel: Channel
    request_id: str


@dataclass(slots=True)
class _Item:
    """An item as parsed before it runs: its target and input, or why it cannot run."""

    position: int
    target: Any = None
    data: BaseModel | None = None
    error: CharterError | None = None


class _Contended(Conflict):
    """The database broke a deadlock or serialization conflict: the whole batch rolled back."""


class Bulk:
    """Runs the bulk requests of one :class:`~charter.Charter` (see the module docstring)."""

    def __init__(self, runtime: Runtime, committer: Committer, *, max_batch: int) -> None:
        self.runtime = runtime
        self.committer = committer
        self.max_batch = max_batch
        self._lockers: dict[tuple[str, str | None], Any] = {}
        #: Per action: its pipeline, and the same without the rate limit stage.
        self._counted: dict[str, tuple[Pipeline, Pipeline]] = {}

    def execute(self, request: BatchRequest) -> BatchOutcome:
        """Run every item of ``request`` through its action's pipeline, in its mode."""
        spec = request.spec
        mode = spec.bulk
        if mode is None:
            raise BulkUnsupported(
                f"{spec.name} takes one item per call (it is not declared with bulk=)"
            )
        self._check_size(spec, request.items)
        check_reason(spec, request.actor, request.reason)  # the batch's, once: before any item
        _check_batch_key(spec, request.key)
        if request.key is not None and request.policy.credential_denial(request.actor) is not None:
            # No replay for a credential that could not make the call (a token without the
            # action's scope, an impersonation no grant covers): the batch runs unkeyed, and
            # each item is refused as in a new batch; the stored outcome is never told.
            request = dataclasses.replace(request, key=None)
        items = [self._parse(spec, position, item) for position, item in enumerate(request.items)]
        fingerprint = None
        if request.key is not None:
            fp_key = fingerprint_key(self.runtime.audit_trail.keyring)
            parts = [
                item_fingerprint(spec, i.target, i.data, request.items[i.position], key=fp_key)
                for i in items
            ]
            fingerprint = batch_fingerprint(spec, mode, parts)
        if mode is BulkMode.PER_ITEM:
            return self._per_item(request, items, fingerprint)
        return self._all_or_nothing(request, items, fingerprint)

    # -- per item: one transaction each ----------------------------------------------------

    def _per_item(
        self, request: BatchRequest, items: list[_Item], fingerprint: str | None
    ) -> BatchOutcome:
        """Each item counted, then run, as its single call; the batch's key claimed once counted.

        Every item is counted against the rate limits as its single call is, before
        its input is looked at: an item over the limit is refused ``rate_limited``,
        an invalid one too (it is refused ``invalid_input`` only under the limit).
        The batch's key is claimed (or its stored result replayed) once an item has
        passed its count, so a batch none of whose items passes (an actor over the
        limit) writes no idempotency record and is answered item by item, unstored;
        a replay counts every item, as their single retries would be counted: an item
        over the limit is answered ``rate_limited`` instead of its stored result
        (:meth:`_counted_replay`).
        """
        spec = request.spec
        batch_call = self._batch_call(request, fingerprint)
        counter = _stage(request.pipeline, "rate_limit")
        counted = self._without(request.pipeline, counter)
        claimed = fingerprint is None
        over: dict[int, CharterError] = {}  # the items refused by their count
        results: list[BatchItem] = []
        rate_limit: tuple[Any, ...] = ()
        for item in items:
            key = None if request.key is None else item_key(request.key, item.position)
            call = Call(
                spec, self._context(request, item.position, key),
                raw_input=item.data, target=item.target,
            )  # fmt: skip
            pipeline = request.pipeline
            if counter is not None and (item.error is not None or not claimed):
                try:
                    _count(counter, call)  # as the single call, before its input is read
                except CharterError as exc:
                    over[item.position] = exc
                    results.append(BatchItem.refused(item.position, exc))
                    continue
                pipeline = counted
            if not claimed:
                try:
                    stored = self._claim_batch(request, batch_call)
                except BaseException:
                    call.give_back()
                    raise
                if stored is not None:
                    call.give_back()
                    rest = items[item.position + 1 :]
                    return self._counted_replay(counter, request, rest, over, stored)
                claimed = True
            if item.error is not None:
                call.give_back()
                rate_limit = call.rate_limit or rate_limit
                results.append(BatchItem.refused(item.position, item.error))
                continue
            try:
                outcome = run(pipeline, call)
            except CharterError as exc:
                results.append(BatchItem.refused(item.position, exc))
                continue
            rate_limit = outcome.rate_limit or rate_limit
            results.append(BatchItem.of(item.position, outcome))
        batch = BatchOutcome(
            spec.name, BulkMode.PER_ITEM, tuple(results), request.request_id,
            rate_limit=rate_limit,
        )  # fmt: skip
        if fingerprint is not None and claimed:
            self._store_batch(batch_call, batch)
        return batch

    def _counted_replay(
        self,
        counter: Stage | None,
        request: BatchRequest,
        rest: Sequence[_Item],
        over: dict[int, CharterError],
        stored: BatchOutcome,
    ) -> BatchOutcome:
        """A stored batch's replay, each item counted as its single retry would be.

        A replay counts one call per item, of the action's class (the items the
        loop did not reach are counted here). An item over the limit is answered as
        its single retry would be, refused ``rate_limited``; the others are their
        stored results, marked replayed. Such an answer is not the whole stored
        result: it is not marked replayed, and nothing is stored for it.
        """
        if counter is not None:
            for item in rest:
                call = Call(request.spec, self._context(request, item.position, None))
                try:
                    _count(counter, call)
                except CharterError as exc:
                    over[item.position] = exc
                    continue
                call.give_back()
        if not over:
            return stored
        items = tuple(
            BatchItem.refused(item.position, over[item.position])
            if item.position in over
            else dataclasses.replace(item, status="replayed")
            if item.error is None
            else dataclasses.replace(item, replayed=True)
            for item in stored.items
        )
        return BatchOutcome(
            request.spec.name, BulkMode.PER_ITEM, items, request.request_id, replayed=False
        )

    def _without(self, pipeline: Pipeline, stage: Stage | None) -> Pipeline:
        """``pipeline`` without ``stage`` (the rate limit, for an item counted already)."""
        if stage is None:
            return pipeline
        cached = self._counted.get(pipeline.action)
        if cached is None or cached[0] is not pipeline:
            prepare = tuple(s for s in pipeline.prepare if s is not stage)
            cached = self._counted[pipeline.action] = (
                pipeline, dataclasses.replace(pipeline, prepare=prepare)
            )  # fmt: skip
        return cached[1]

    def _claim_batch(self, request: BatchRequest, batch_call: Call) -> BatchOutcome | None:
        """Commit the batch's claim; answer a stored or another request's key instead.

        ``None``: run the items — a new key, or the same batch again after a crash
        or alongside a duplicate (each item's own key keeps it to one application).
        """
        runtime = self.runtime
        for _ in range(CLAIM_ATTEMPTS):
            try:
                with runtime.write_session() as session:
                    with claims.claiming():
                        session.execute(claims.CLAIM, claims.claim_params(runtime, batch_call))
                    session.commit()
                return None
            except claims.ClaimTaken:
                pass
            row = self._lookup(batch_call)
            if row is None:  # purged in between: claim again
                continue
            if row.fingerprint == batch_call.fingerprint and row.completed_at is None:
                return None
            stored = StoredOutcome.from_row(row) if row.completed_at is not None else None
            outcome = claims.replay_stored(
                self.committer, batch_call, stored, row.fingerprint, row.action, batch=True
            )
            return _replayed(request, batch_call, outcome.body)
        raise IdempotencyKeyInProgress("The batch's Idempotency-Key keeps changing; retry shortly.")

    def _lookup(self, call: Call) -> Any:
        tenant, subject, key = call.ctx.idempotency_scope
        runtime = self.runtime
        engine = runtime.autocommit if runtime.postgres else runtime.engine
        with translate_errors(), engine.connect() as connection:
            return lookup(connection, tenant, subject, key)

    def _store_batch(self, batch_call: Call, batch: BatchOutcome) -> None:
        """Store the whole result under the batch's key (a duplicate that stored first wins)."""
        params = completion_params(
            batch_call.ctx.idempotency_scope, status=200, body=batch.as_json(), error=None,
            outcome="ok", resource_id=None, now=self.runtime.clock(),
        )  # fmt: skip
        values = {name.removeprefix("u_"): value for name, value in params.items()}
        dialect = postgresql if self.runtime.postgres else sqlite
        statement = dialect.insert(outcome_table).values(values).on_conflict_do_nothing()
        with self.runtime.write_session() as session:
            session.execute(statement)
            session.commit()

    # -- all or nothing: one transaction ---------------------------------------------------

    def _all_or_nothing(
        self, request: BatchRequest, items: list[_Item], fingerprint: str | None
    ) -> BatchOutcome:
        failures: list[tuple[int, CharterError]] = []
        calls: list[tuple[int, Call]] = []
        releases: list[Any] = []
        try:
            for item in items:
                call = self._prepare(request, item, failures)
                releases.extend(call.releases if call is not None else ())
                if call is not None:
                    calls.append((item.position, call))
            batch_call = self._batch_call(request, fingerprint)
            for _ in range(CLAIM_ATTEMPTS):
                try:
                    return self._transact(request, batch_call, calls, failures)
                except claims.ClaimTaken:
                    outcome = claims.answer_duplicate(
                        self.runtime, self.committer, batch_call, batch=True
                    )
                    if outcome is not None:
                        return _replayed(request, batch_call, outcome.body)
                    for _, call in calls:
                        call.restart()
            raise IdempotencyKeyInProgress(
                "Another request with this Idempotency-Key keeps starting; retry shortly."
            )
        finally:
            for release in releases:
                release()

    def _prepare(
        self, request: BatchRequest, item: _Item, failures: list[tuple[int, CharterError]]
    ) -> Call | None:
        """The item's stages before the transaction (rate limit, validation), or its failure.

        An item that could not be parsed is still counted against the rate limits
        first, as its single call is: over the limit, its failure is ``rate_limited``.
        """
        call = Call(
            request.spec, self._context(request, item.position, request.key),
            raw_input=item.data, target=item.target,
        )  # fmt: skip
        if item.error is not None:
            counter = _stage(request.pipeline, "rate_limit")
            try:
                if counter is not None:
                    _count(counter, call)
            except CharterError as exc:
                failures.append((item.position, exc))
                return None
            call.give_back()
            failures.append((item.position, item.error))
            return None
        try:
            try:
                for stage in request.pipeline.prepare:
                    if stage.name not in _BATCH_OWN:
                        stage.run(call)
            finally:
                call.settle()  # the item's rate limit reply, before the next item is sent
        except CharterError as exc:
            failures.append((item.position, exc))
            call.give_back()
            return None
        return call

    def _transact(
        self,
        request: BatchRequest,
        batch_call: Call,
        calls: list[tuple[int, Call]],
        failures: list[tuple[int, CharterError]],
    ) -> BatchOutcome:
        """The batch's one transaction: claim, lock in order, every item, one commit."""
        runtime, spec = self.runtime, request.spec
        found = list(failures)
        refused: dict[int, AuditEntry] = {}
        lease = runtime.audit_trail.lease()
        try:
            with translate_errors(), _contended(), runtime.sessions() as session:
                TenantGuard.begin(session, request.actor)
                connection = session.connection()
                if batch_call.keyed and not found:
                    with claims.claiming():
                        connection.execute(claims.CLAIM, claims.claim_params(runtime, batch_call))
                if runtime.postgres and spec.mutates:
                    self._lock_in_order(connection, spec, request.actor, calls)
                for position, call in calls:
                    failed = self._run_item(session, connection, request.pipeline, call)
                    if failed is not None:
                        found.append((position, failed[0]))
                        if failed[1] is not None:
                            refused[position] = failed[1]
                if not found:
                    return self._commit(session, connection, lease, request, batch_call, calls)
                session.rollback()
        finally:
            lease.rolled_back()
        self._audit_failed(refused, calls, {p for p, _ in found})
        raise BatchFailed(spec.name, len(request.items), sorted(found, key=lambda f: f[0]))

    def _run_item(
        self, session: Session, connection: Connection, pipeline: Pipeline, call: Call
    ) -> tuple[CharterError, AuditEntry | None] | None:
        """One item's transaction stages in a SAVEPOINT: None, or its error (and audit entry)."""
        TenantGuard.begin(session, call.ctx.actor)  # this item's created and changed records
        call.session = call.ctx.session = session
        call.connection = connection
        savepoint = session.begin_nested()
        try:
            with translate_errors(), _contended():
                for stage in pipeline.transaction:
                    if stage.name not in _BATCH_OWN:
                        stage.run(call)
                session.flush()
        except Forbidden as exc:  # the tenant guard, at a flush
            refusal = Refusal(exc, exc.decision, call.record)
            entry = refusal_entry(call, refusal)
            savepoint.rollback()
            return exc, entry
        except Refusal as refusal:
            entry = refusal_entry(call, refusal)  # before the rollback expires the record
            savepoint.rollback()
            return refusal.error, entry
        except _Contended:
            raise
        except CharterError as exc:
            if exc.status >= 500 and not isinstance(exc, HandlerFailed):
                raise  # the database itself failed: the batch cannot go on
            savepoint.rollback()
            return exc, None
        savepoint.commit()
        return None

    def _commit(
        self,
        session: Session,
        connection: Connection,
        lease: Any,
        request: BatchRequest,
        batch_call: Call,
        calls: list[tuple[int, Call]],
    ) -> BatchOutcome:
        """Every item applied: their audit entries and the batch's outcome, then COMMIT."""
        results = [BatchItem.of(position, call.result()) for position, call in calls]
        batch = BatchOutcome(
            request.spec.name, BulkMode.ALL_OR_NOTHING, tuple(results), request.request_id
        )
        stored = None
        if batch_call.keyed:
            stored = completion_params(
                batch_call.ctx.idempotency_scope, status=200, body=batch.as_json(), error=None,
                outcome="ok", resource_id=None, now=batch_call.ctx.now,
            )  # fmt: skip
        entries = [entry for _, call in calls for entry in call.writes.entries]
        self.committer.write(session, lease, entries, stored, connection)
        finish(session, lease)
        return batch

    def _audit_failed(
        self, refused: dict[int, AuditEntry], calls: list[tuple[int, Call]], failed: set[int]
    ) -> None:
        """A failed batch's trail: each refusal as its single call's; the others, not applied.

        Nothing of the batch committed, so no entry records a state the batch itself
        produced. An item that read a record an earlier item of the batch had changed
        (the same invoice twice: the second saw the first's uncommitted ``approved``)
        is recorded with the record's state as it was before the batch — the state it
        had throughout, committed — as both its state before and after; ``None`` when
        the batch never read that state (the record was only changed as a side effect).
        The items that passed are recorded with outcome ``batch_failed`` and state after
        = state before (that same pre-batch state).
        """
        entries: list[AuditEntry] = []
        passed: list[AuditEntry] = []
        changed: dict[tuple[str | None, str | None], str | None] = {}  # record -> pre-batch state

        def committed(entry: AuditEntry) -> AuditEntry:
            record = (entry.resource_type, entry.resource_id)
            if entry.resource_id is None or record not in changed:
                return entry
            state = changed[record]
            return dataclasses.replace(entry, state_before=state, state_after=state)

        for position, call in calls:  # in order: what each item saw, and what it changed
            if position in refused:
                entries.append(committed(refused[position]))
                continue
            if position in failed:
                continue
            for entry in call.writes.entries:
                detail = {k: v for k, v in (entry.detail or {}).items() if k != "touched"}
                not_applied = committed(entry)
                not_applied = dataclasses.replace(
                    not_applied, outcome=BatchFailed.code, state_after=not_applied.state_before
                )
                not_applied.detail = detail or None
                passed.append(not_applied)
                # This item's savepoint was kept: what it changed, later items saw changed.
                if entry.resource_id is not None:
                    changed.setdefault((entry.resource_type, entry.resource_id), entry.state_before)
                for touched in (entry.detail or {}).get("touched", ()):
                    changed.setdefault(
                        (touched.get("type"), touched.get("id")), touched.get("before")
                    )
        entries.extend(passed)
        if entries:
            with self.committer.transaction() as (session, lease):
                self.committer.write(session, lease, entries, None)

    def _lock_in_order(
        self, connection: Connection, spec: ActionSpec, actor: Actor, calls: list[tuple[int, Call]]
    ) -> None:
        """Lock every item's records, tenant-scoped, in (table, key) order: no deadlock."""
        wanted: dict[tuple[str, str | None], tuple[ResourceSpec, set[Any]]] = {}

        def want(resource: ResourceSpec, by: str | None, key: Any) -> None:
            if key is not None:
                wanted.setdefault((resource.name, by), (resource, set()))[1].add(key)

        for _, call in calls:
            if spec.target is not None and spec.resource is not None:
                want(spec.resource, spec.by, spec.resource.coerce(spec.by, call.target))
            if spec.locks is not None:
                for model, id in spec.locks(call.data):
                    resource = self.runtime.tenancy.resource_of_model(model)
                    if resource is not None:  # else the load stage refuses the declaration
                        want(resource, None, resource.coerce(None, id))
        for (_, by), (resource, keys) in sorted(
            wanted.items(), key=lambda w: (w[0][0], w[0][1] or "")
        ):
            statement = self._locker(resource, by)
            ordered = sorted(keys)
            for start in range(0, len(ordered), _LOCK_CHUNK):
                chunk = ordered[start : start + _LOCK_CHUNK]
                connection.execute(statement, {"b_keys": chunk, "b_tenant": actor.tenant_id})

    def _locker(self, resource: ResourceSpec, by: str | None) -> Any:
        """``SELECT key ... WHERE key IN (...) AND tenant = ... ORDER BY key FOR UPDATE``, once."""
        statement = self._lockers.get((resource.name, by))
        if statement is None:
            column = resource.column(by or resource.id)
            order = column.collate("C") if isinstance(column.type, String) else column
            statement = select(column).where(column.in_(bindparam("b_keys", expanding=True)))
            if resource.tenant is not None:  # another tenant's row is never locked, nor waited on
                statement = statement.where(
                    resource.column(resource.tenant) == bindparam("b_tenant")
                )
            table = sa_inspect(resource.model).local_table
            statement = statement.order_by(order).with_for_update(of=table)
            statement = self._lockers[(resource.name, by)] = statement.execution_options(
                **{SCOPED: True}
            )
        return statement

    # -- shared ----------------------------------------------------------------------------

    def _check_size(self, spec: ActionSpec, items: Any) -> None:
        if isinstance(items, str | bytes | dict) or not isinstance(items, Sequence):
            raise InvalidInput("a batch's items are a list", errors=[])
        largest = spec.max_batch or self.max_batch
        if not items:
            raise BatchEmpty(f"{spec.name}: the batch has no items; send at least one")
        if len(items) > largest:
            raise BatchTooLarge(
                f"{spec.name} takes at most {largest} items per batch, not {len(items)}; "
                "nothing was applied: split the batch",
                max=largest,
                size=len(items),
            )

    @staticmethod
    def _parse(spec: ActionSpec, position: int, raw: Any) -> _Item:
        try:
            target, payload = split_item(spec, raw)
            data = spec.validate(payload)
        except CharterError as exc:
            return _Item(position, error=exc)
        if spec.target not in (None, "argument"):
            target = getattr(data, str(spec.target))
        return _Item(position, target, data)

    def _context(self, request: BatchRequest, position: int, key: str | None) -> ActionContext:
        ctx = ActionContext(
            action=request.spec.name, actor=request.actor, channel=request.channel,
            now=self.runtime.clock(), request_id=request.request_id, reason=request.reason,
            idempotency_key=key,
        )  # fmt: skip
        ctx.extra["batch"] = {
            "key": request.key, "position": position, "size": len(request.items),
            "mode": str(request.spec.bulk),
        }  # fmt: skip
        return ctx

    def _batch_call(self, request: BatchRequest, fingerprint: str | None) -> Call:
        """The batch as one call: its claim, its replay, the audit of a reused key."""
        ctx = ActionContext(
            action=request.spec.name, actor=request.actor, channel=request.channel,
            now=self.runtime.clock(), request_id=request.request_id, reason=request.reason,
            idempotency_key=request.key,
        )  # fmt: skip
        ctx.extra["batch"] = {"key": request.key, "size": len(request.items)}
        call = Call(request.spec, ctx)
        call.fingerprint = fingerprint
        return call


def _stage(pipeline: Pipeline, name: str) -> Stage | None:
    return next((stage for stage in pipeline.prepare if stage.name == name), None)


def _count(counter: Stage, call: Call) -> None:
    """Count ``call`` against its rate class now (its reply read): 429 over the limit.

    What the count holds (a concurrency slot) stays in ``call.releases`` for the
    runner to give back; on a refusal it is given back here.
    """
    try:
        call.count(counter)
    except BaseException:
        call.give_back()
        raise


def _replayed(request: BatchRequest, batch_call: Call, body: Any) -> BatchOutcome:
    """A stored batch result as the actor asking now may see it (field visibility).

    The items' bodies were stored as the original caller saw them; the fields the
    current actor may not see (:func:`~charter.policy.visibility.hidden_fields`,
    for this actor and context, as for a fresh result) are left out. Only removes.
    """
    batch = BatchOutcome.from_json(body, request_id=request.request_id, replayed=True)
    hidden = hidden_fields(request.spec.resource, batch_call.ctx.actor, batch_call.ctx)
    if not hidden:
        return batch
    items = tuple(
        item if item.body is None else dataclasses.replace(item, body=redact(item.body, hidden))
        for item in batch.items
    )
    return dataclasses.replace(batch, items=items)


def _check_batch_key(spec: ActionSpec, key: str | None) -> None:
    """The batch's key: well-formed, short enough for ``#<position>``, as the action declares."""
    key = validate_key(key)
    if key is not None and len(key) > MAX_BATCH_KEY:
        raise IdempotencyKeyInvalid(
            f"A batch's Idempotency-Key is at most {MAX_BATCH_KEY} characters (each item "
            "holds it with '#<position>')."
        )
    if key is not None and spec.idempotency is IdempotencyMode.NONE:
        raise IdempotencyKeyUnsupported(
            f"{spec.name} takes no idempotency key (idempotency='none'): send the batch "
            "without the Idempotency-Key header"
        )
    if key is None and spec.idempotency is IdempotencyMode.REQUIRED:
        raise IdempotencyKeyMissing(
            f"{spec.name} requires an idempotency key (the Idempotency-Key header) for its "
            "batches too: generate one per batch and reuse it when you retry"
        )


@contextmanager
def _contended() -> Iterator[None]:
    try:
        yield
    except DBAPIError as exc:
        what = contention(exc)
        if what is None:
            raise
        error = _Contended(
            f"the batch collided with concurrent changes ({what}) and was rolled back; "
            "nothing was applied. Retry shortly."
        )
        error.headers["Retry-After"] = "1"
        raise error from exc
