"""The reference service's operator directory: who may run ``charter run``/``import``/``export``.

Operators are not users: the HTTP channel never authenticates them, and the
user directory (:data:`charter.demo.service.DEMO_USERS`) does not know them.
Each is an actor of kind ``operator`` with a tenant, roles and the scopes of
its credential; the gate's rules apply to it as to anyone
(:mod:`charter.integrations.operator`).

* ``ops-olga`` (acme): an admin operator who reads and prepares invoices and
  voids them (``invoices:read``, ``invoices:write``) — but may not approve
  (no ``invoices:approve``) nor top up credits (no ``credits:write``);
* ``ops-oscar`` (acme): a member operator with the same scopes; the rules let
  him void only the invoices he created;
* ``ops-gus`` (globex): globex's admin operator, who sees nothing of acme.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = ["operators"]

_WRITE = ["invoices:read", "invoices:write"]

#: ``charter run ... --as ops-olga --demo`` reads this (``--operators`` or CHARTER_OPERATORS
#: name another directory).
operators: Mapping[str, Mapping[str, Any]] = {
    "ops-olga": {"tenant": "acme", "roles": ["admin"], "scopes": _WRITE},
    "ops-oscar": {"tenant": "acme", "roles": ["member"], "scopes": _WRITE},
    "ops-gus": {"tenant": "globex", "roles": ["admin"], "scopes": _WRITE},
}
