"""Credits and quotas, with a double-entry ledger, enforced inside the gate's transaction.

* :mod:`.amounts` — amounts as positive integers in minor units, bounded;
* :mod:`.tables` — accounts, the append-only ledger, holds, quota counters;
* :mod:`.ledger` — a movement: one conditional debit, a credit and a ledger row;
* :mod:`.holds` — reserve, capture or release, expiry;
* :mod:`.quotas` — period quotas, one conditional counter write;
* :mod:`.costs` — an action's ``cost=`` and ``tags=``;
* :mod:`.stage` — the ``charge`` stage of the pipeline;
* :mod:`.book` — :class:`Credits`, the facade: open, grant, refund, hold, sweep, verify;
* :mod:`.verify` — each balance equals its ledger entries; the ledger sums to zero.
"""

from .amounts import MAX_AMOUNT, check_amount, to_minor
from .book import Account, Credits
from .costs import TAGS, Cost
from .holds import Hold
from .quotas import Quota
from .verify import LedgerProblem, LedgerReport, verify_ledger

__all__ = [
    "MAX_AMOUNT",
    "TAGS",
    "Account",
    "Cost",
    "Credits",
    "Hold",
    "LedgerProblem",
    "LedgerReport",
    "Quota",
    "check_amount",
    "to_minor",
    "verify_ledger",
]
