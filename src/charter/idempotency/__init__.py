"""Exactly once: idempotency keys, their stored outcomes, and recovery points.

* :mod:`.keys` — what a key is, its scope and fingerprint, the errors (the semantics);
* :mod:`.store` — the claim and outcome tables, their statements, the replay cache;
* :mod:`.claims` — the gate's use of them: claim, answer a duplicate, store a refusal;
* :mod:`.recovery` — recovery points around calls to outside services.

The stages that run them are assembled by :mod:`charter.pipeline.build`.
"""

from .keys import (
    DEFAULT_RETENTION,
    MAX_KEY_LENGTH,
    IdempotencyKeyInProgress,
    IdempotencyKeyInvalid,
    IdempotencyKeyMissing,
    IdempotencyKeyReused,
    IdempotencyKeyUnsupported,
    IdempotencyMode,
    ReplayedError,
    fingerprint,
    validate_key,
)
from .store import (
    OutcomeCache,
    StoredOutcome,
    claim_statement,
    claim_values,
    idempotency_table,
    lookup,
    outcome_table,
    purge,
)

__all__ = [
    "DEFAULT_RETENTION",
    "MAX_KEY_LENGTH",
    "IdempotencyKeyInProgress",
    "IdempotencyKeyInvalid",
    "IdempotencyKeyMissing",
    "IdempotencyKeyReused",
    "IdempotencyKeyUnsupported",
    "IdempotencyMode",
    "OutcomeCache",
    "ReplayedError",
    "StoredOutcome",
    "claim_statement",
    "claim_values",
    "fingerprint",
    "idempotency_table",
    "lookup",
    "outcome_table",
    "purge",
    "validate_key",
]
