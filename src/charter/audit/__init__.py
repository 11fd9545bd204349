"""The audit trail: one home for what an entry is, how it is sealed, and how it is verified.

* :mod:`charter.audit.entry` — the tables, :class:`AuditEntry`, the bytes a MAC covers;
* :mod:`charter.audit.trail` — keys, writer streams and leases (sealing);
* :mod:`charter.audit.checkpoint` — signed checkpoints of the streams' heads;
* :mod:`charter.audit.anchor` — their copy outside the database (file, another database);
* :mod:`charter.audit.schedule` — checkpoints written by every process that runs the gate;
* :mod:`charter.audit.prune` — deleting old entries with a signed record of how far;
* :mod:`charter.audit.verify` — verification against checkpoints and the anchor.

The gate builds one entry per call (:func:`charter.pipeline.stages` ``seal``) and
commits it with the effect (:mod:`charter.pipeline.writes`).
"""

from .anchor import (
    AnchorReading,
    AnchorRecord,
    AuditAnchor,
    FileAnchor,
    SqlAnchor,
    anchor_from_uri,
    read_anchor,
)
from .checkpoint import write_checkpoint
from .entry import (
    ENTRY_INSERT,
    AuditEntry,
    audit_table,
    canonical_message,
    checkpoint_table,
    digest_input,
    link_table,
)
from .prune import Pruned, prune
from .schedule import AuditCheckpointer
from .trail import AuditKeyring, AuditLease, AuditTrail
from .verify import ANCHOR_GRACE, AuditProblem, VerificationReport, verify

__all__ = [
    "ANCHOR_GRACE",
    "ENTRY_INSERT",
    "AnchorReading",
    "AnchorRecord",
    "AuditAnchor",
    "AuditCheckpointer",
    "AuditEntry",
    "AuditKeyring",
    "AuditLease",
    "AuditProblem",
    "AuditTrail",
    "FileAnchor",
    "Pruned",
    "SqlAnchor",
    "VerificationReport",
    "anchor_from_uri",
    "audit_table",
    "canonical_message",
    "checkpoint_table",
    "digest_input",
    "link_table",
    "prune",
    "read_anchor",
    "verify",
    "write_checkpoint",
]
