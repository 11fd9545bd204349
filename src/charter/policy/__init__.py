"""Charter's policy engine: rules as expressions, compiled to Python and to SQL.

One rule tree serves four uses: decide for one record (:meth:`ActionPolicy.is_allowed`
and its explained twin :meth:`ActionPolicy.decide`), filter a query
(:meth:`ActionPolicy.where`; :meth:`ActionPolicy.bound_where` and
:meth:`ActionPolicy.page_statement` build the clause once per actor shape), tell
what is safe next (:func:`allowed_actions`) and enumerate a permission matrix for
review (:func:`permission_matrix`).

See :mod:`charter.policy.expr` for the expression language,
:mod:`charter.policy.pyeval` for why rules are compiled to Python source and
:mod:`charter.policy.sql` for how SQL's NULLs are made to agree with Python.
"""

from .agreement import assert_filter_agrees, filter_disagreements
from .engine import (
    ActionPolicy,
    BoundFilter,
    BoundStatement,
    PolicySet,
    Readers,
    Rule,
    allowed_actions,
)
from .expr import ALWAYS, NEVER, A, C, Condition, Expr, R, Value
from .matrix import PermissionMatrix, assert_matrix_snapshot, permission_matrix

__all__ = [
    "ALWAYS",
    "NEVER",
    "A",
    "ActionPolicy",
    "BoundFilter",
    "BoundStatement",
    "C",
    "Condition",
    "Expr",
    "PermissionMatrix",
    "PolicySet",
    "R",
    "Readers",
    "Rule",
    "Value",
    "allowed_actions",
    "assert_filter_agrees",
    "assert_matrix_snapshot",
    "filter_disagreements",
    "permission_matrix",
]
