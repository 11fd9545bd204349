"""The audit trail: one home for what an entry is, how it is sealed, and how it is verified.

* :mod:`charter.audit.entry` — the tables, :class:`AuditEntry`, the bytes a MAC covers;
* :mod:`charter.audit.trail` — keys, writer streams and leases (sealing);
* :mod:`charter.audit.verify` — verification and signed checkpoints.

The gate builds one entry per call (:func:`charter.pipeline.stages` ``seal``) and
commits it with the effect (:mod:`charter.pipeline.writes`).
"""

from .entry import (
    ENTRY_INSERT,
    AuditEntry,
    audit_table,
    canonical_message,
    checkpoint_table,
    digest_input,
    link_table,
)
from .trail import AuditKeyring, AuditLease, AuditTrail
from .verify import AuditProblem, VerificationReport, checkpoint, verify

__all__ = [
    "ENTRY_INSERT",
    "AuditEntry",
    "AuditKeyring",
    "AuditLease",
    "AuditProblem",
    "AuditTrail",
    "VerificationReport",
    "audit_table",
    "canonical_message",
    "checkpoint",
    "checkpoint_table",
    "digest_input",
    "link_table",
    "verify",
]
