"""Accepted findings: a reviewed file, each acceptance bound to one finding's fingerprint.

The file is JSON (or YAML, if its name ends in ``.yml``/``.yaml`` and PyYAML is
installed)::

    {
      "accepted": [
        {
          "code": "CH004",
          "subject": "invoice.pay",
          "fingerprint": "3f1c0f2a9b7d4e21a8c6b5d4e3f2a1b0",
          "justification": "Paying is the tenant admin's job, for any approved invoice."
        }
      ]
    }

An acceptance matches a finding only when code, subject and fingerprint are
all equal. The fingerprint covers the facts the finding depends on (the
rules, the tags, the scope, the endpoint), so when what was accepted changes
the acceptance stops matching, the finding is reported again and the check
fails until someone reviews it anew. An acceptance that matches no finding is
*stale* and reported as such (it accepts nothing).

Bounds: the file is at most :data:`MAX_FILE_BYTES`, holds at most
:data:`MAX_ACCEPTED` entries, and each justification is 10 to 2000 characters:
"ok" is not a justification.
"""

from __future__ import annotations

import importlib
import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import ConfigurationError
from .check import RULES, Finding

__all__ = [
    "MAX_ACCEPTED",
    "MAX_FILE_BYTES",
    "Acceptance",
    "Judged",
    "acceptance_for",
    "judge",
    "load_accepted",
    "render_accepted",
]

MAX_FILE_BYTES = 1 << 20
MAX_ACCEPTED = 10_000
_FINGERPRINT = re.compile(r"^[0-9a-f]{32}$")
_FIELDS = {"code", "subject", "fingerprint", "justification"}


@dataclass(frozen=True, slots=True)
class Acceptance:
    """One reviewed acceptance of one finding."""

    code: str
    subject: str
    fingerprint: str
    justification: str

    def matches(self, finding: Finding) -> bool:
        return (self.code, self.subject, self.fingerprint) == (
            finding.code,
            finding.subject,
            finding.fingerprint,
        )


def acceptance_for(finding: Finding, justification: str) -> Acceptance:
    """The acceptance of ``finding`` (what to paste into the file, with a real justification)."""
    return _acceptance(
        {
            "code": finding.code,
            "subject": finding.subject,
            "fingerprint": finding.fingerprint,
            "justification": justification,
        },
        0,
    )


def load_accepted(path: str | Path) -> tuple[Acceptance, ...]:
    """Read and validate an accepted-findings file; any mistake is a ConfigurationError."""
    target = Path(path)
    try:
        size = target.stat().st_size
        if size > MAX_FILE_BYTES:
            raise ConfigurationError(f"{target}: larger than {MAX_FILE_BYTES} bytes")
        text = target.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigurationError(f"cannot read the accepted findings {target}: {exc}") from exc
    document = _parse(target, text)
    if not isinstance(document, Mapping) or set(document) - {"accepted"}:
        raise ConfigurationError(f"{target}: expected an object with one key, 'accepted'")
    items = document.get("accepted") or []
    if not isinstance(items, list) or len(items) > MAX_ACCEPTED:
        raise ConfigurationError(f"{target}: 'accepted' is a list of at most {MAX_ACCEPTED}")
    found = tuple(_acceptance(item, number) for number, item in enumerate(items, 1))
    keys = [(a.code, a.subject, a.fingerprint) for a in found]
    if len(set(keys)) != len(keys):
        raise ConfigurationError(f"{target}: the same finding is accepted twice")
    return found


def _parse(target: Path, text: str) -> Any:
    if target.suffix.lower() in (".yml", ".yaml"):
        try:
            yaml = importlib.import_module("yaml")  # optional: PyYAML
        except ImportError as exc:
            raise ConfigurationError(
                f"{target}: reading YAML needs PyYAML (pip install pyyaml), or use JSON"
            ) from exc
        try:
            return yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ConfigurationError(f"{target}: not valid YAML: {exc}") from exc
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigurationError(f"{target}: not valid JSON: {exc}") from exc


def _acceptance(item: Any, number: int) -> Acceptance:
    where = f"accepted finding #{number}"
    if not isinstance(item, Mapping) or set(item) != _FIELDS:
        raise ConfigurationError(f"{where}: needs exactly {', '.join(sorted(_FIELDS))}")
    values = {k: item[k] for k in _FIELDS}
    if not all(isinstance(v, str) for v in values.values()):
        raise ConfigurationError(f"{where}: every field is a string")
    if values["code"] not in RULES:
        raise ConfigurationError(f"{where}: unknown code {values['code']!r}")
    if not _FINGERPRINT.match(values["fingerprint"]):
        raise ConfigurationError(f"{where}: the fingerprint is 32 lowercase hex digits")
    if not 0 < len(values["subject"]) <= 500:
        raise ConfigurationError(f"{where}: the subject is 1 to 500 characters")
    justification = " ".join(values["justification"].split())
    if not 10 <= len(justification) <= 2000:
        raise ConfigurationError(f"{where}: the justification says why, in 10 to 2000 characters")
    return Acceptance(values["code"], values["subject"], values["fingerprint"], justification)


@dataclass(frozen=True, slots=True)
class Judged:
    """The findings split by acceptance, and the acceptances that accept nothing."""

    findings: tuple[Finding, ...]
    accepted: Mapping[str, Acceptance]  # fingerprint -> its acceptance
    stale: tuple[Acceptance, ...]

    def is_accepted(self, finding: Finding) -> bool:
        return finding.fingerprint in self.accepted

    @property
    def open(self) -> tuple[Finding, ...]:
        """The findings no acceptance covers."""
        return tuple(f for f in self.findings if not self.is_accepted(f))

    @property
    def errors(self) -> tuple[Finding, ...]:
        """The open errors: any one fails the check."""
        return tuple(f for f in self.open if f.severity == "error")

    @property
    def warnings(self) -> tuple[Finding, ...]:
        return tuple(f for f in self.open if f.severity == "warning")

    def changed(self, finding: Finding) -> Acceptance | None:
        """A stale acceptance of the same code and subject: what was accepted has changed."""
        for acceptance in self.stale:
            if (acceptance.code, acceptance.subject) == (finding.code, finding.subject):
                return acceptance
        return None

    @property
    def exit_code(self) -> int:
        return 1 if self.errors else 0


def judge(findings: Sequence[Finding], acceptances: Iterable[Acceptance] = ()) -> Judged:
    """Match the acceptances with the findings."""
    accepted: dict[str, Acceptance] = {}
    stale: list[Acceptance] = []
    for acceptance in acceptances:
        match = next((f for f in findings if acceptance.matches(f)), None)
        if match is None:
            stale.append(acceptance)
        else:
            accepted[match.fingerprint] = acceptance
    return Judged(tuple(findings), accepted, tuple(stale))


def render_accepted(acceptances: Iterable[Acceptance]) -> str:
    """The accepted-findings file for ``acceptances``, canonical (sorted, stable)."""
    items = sorted(acceptances, key=lambda a: (a.code, a.subject, a.fingerprint))
    body = {
        "accepted": [
            {
                "code": a.code,
                "subject": a.subject,
                "fingerprint": a.fingerprint,
                "justification": a.justification,
            }
            for a in items
        ]
    }
    return json.dumps(body, indent=2, sort_keys=True) + "\n"
