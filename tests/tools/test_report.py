"""charter report: one self-contained page, audit statistics counted exactly on SQLite and
PostgreSQL, and what headless Chromium shows when it renders the page."""

from __future__ import annotations

import os
import re
import shutil
import struct
import subprocess
import zlib
from collections import Counter
from pathlib import Path

import pytest
from typer.testing import CliRunner

from charter import Charter
from charter.cli import app as cli_app
from charter.errors import CharterError
from charter.testing import make_actor
from charter.tools.accept import judge, load_accepted
from charter.tools.check import find
from charter.tools.report import audit_stats, render_report
from tests.conftest import AUDIT_KEYS
from tests.tools.conftest import DEMO_ENV

ROOT = Path(__file__).resolve().parents[2]
runner = CliRunner()


def _page(inv, stats=None) -> str:
    judged = judge(find(inv), load_accepted(ROOT / "charter.accepted.json"))
    return render_report(inv, judged, stats=stats, title="charter.demo")


def test_the_page_is_self_contained_no_script_no_outside_reference(demo):
    html = _page(demo)
    assert "<script" not in html.lower()
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:|//)""", html, re.IGNORECASE)
    assert "http://" not in html
    assert "https://" not in html
    assert "@import" not in html
    assert "url(http" not in html


def test_the_page_holds_the_catalogue_matrix_workflows_coverage_and_audit_sections(demo):
    html = _page(demo)
    for anchor in ("catalogue", "matrix", "workflows", "coverage", "audit"):
        assert f'<section id="{anchor}">' in html
    assert html.count('<svg class="workflow"') == len(demo.charter.workflows)
    assert "A.has_role(&#x27;approver&#x27;)" in html  # the rules, escaped
    assert "No database was given" in html


def test_text_from_the_application_is_escaped(demo):
    from charter.tools.svg import bar_chart

    svg = bar_chart("<b>title</b>", [("<script>alert(1)</script>", 3)])
    assert "<script>" not in svg
    assert "&lt;script&gt;" in svg


def _activity(charter: Charter) -> None:
    alice = make_actor("alice", "acme", "member", scopes=["invoices:read", "invoices:write"])
    created = charter.execute(alice, "invoice.create", {"customer": "ACME", "amount": "10"},
                              key="create-1")  # fmt: skip
    replay = charter.execute(alice, "invoice.create", {"customer": "ACME", "amount": "10"},
                             key="create-1")  # fmt: skip
    assert replay.replayed
    invoice = created.resource_id
    charter.execute(alice, "invoice.submit", target=invoice)
    approver = make_actor("alice", "acme", "approver", scopes=["invoices:approve"],
                          approval_limit=100)  # fmt: skip
    with pytest.raises(CharterError):  # the creator may not approve her own invoice
        charter.execute(approver, "invoice.approve", target=invoice)
    sam = make_actor("sam", "acme", "support", kind="support", scopes=["invoices:read"])
    for _ in range(2):
        charter.execute(sam.impersonate(alice), "invoice.get", target=invoice, reason="ticket 7")


def test_audit_statistics_count_denials_impersonation_replays_and_actors(database_url, disposing):
    from charter.demo.service import build_charter

    charter = disposing(build_charter(Charter(database_url=database_url, audit_keys=AUDIT_KEYS)))
    _activity(charter)
    with charter.engine.connect() as connection:
        stats = audit_stats(connection)
    assert [("invoice.approve", 1)] == list(stats.denials)
    assert [("sam → alice", 2)] == list(stats.impersonation)
    assert [("invoice.create", 1)] == list(stats.replays)
    assert ("alice", 6) == stats.actors[0]  # create, replay, submit, denial, two reads for her
    assert 6 == stats.calls


def test_the_report_command_writes_the_page_with_charts_from_the_database(
    database_url, disposing, monkeypatch, tmp_path
):
    from charter.demo.service import build_charter

    _activity(disposing(build_charter(Charter(database_url=database_url, audit_keys=AUDIT_KEYS))))
    import charter.demo

    for name, value in DEMO_ENV.items():
        monkeypatch.setenv(name, value)
    monkeypatch.chdir(ROOT)
    monkeypatch.delattr(charter.demo, "app", raising=False)  # see test_check.demo_env
    out = tmp_path / "report.html"
    result = runner.invoke(cli_app, ["report", "charter.demo:app", "-o", str(out),
                                     "--database-url", database_url,
                                     "--accept", "charter.accepted.json"])  # fmt: skip
    assert 0 == result.exit_code, result.output
    html = out.read_text()
    assert "6 audit entries." in html
    assert 'aria-label="Denials per action"' in html
    assert ">invoice.approve</text>" in html


# -- rendered in headless Chromium -----------------------------------------------------------


def _chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        if os.environ.get("CI") == "true":
            pytest.fail("chromium is required under CI (.ci/run installs Debian's package)")
        pytest.skip("chromium is not installed (apt-get install chromium); CI runs this test")
    return found


def _run_chromium(binary: str, *args: str) -> subprocess.CompletedProcess[str]:
    # No network at all: every host resolves to nothing, so the page must be self-contained.
    return subprocess.run(
        [binary, "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
         "--host-resolver-rules=MAP * ~NOTFOUND", "--hide-scrollbars", *args],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip


def _pixels(png: bytes) -> tuple[int, int, list[tuple[int, int, int]]]:
    """Decode an 8-bit RGB/RGBA, non-interlaced PNG (what Chromium writes) to its pixels."""
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    width = height = 0
    channels, data, at = 3, b"", 8
    while at < len(png):
        (length,), kind = struct.unpack(">I", png[at : at + 4]), png[at + 4 : at + 8]
        chunk = png[at + 8 : at + 8 + length]
        if kind == b"IHDR":
            width, height, depth, color = struct.unpack(">IIBB", chunk[:10])
            assert depth == 8
            assert color in (2, 6)
            channels = 4 if color == 6 else 3
        elif kind == b"IDAT":
            data += chunk
        at += 12 + length
    raw, stride = zlib.decompress(data), width * channels
    rows: list[bytearray] = []
    previous = bytearray(stride)
    for y in range(height):
        kind, line = (
            raw[y * (stride + 1)],
            bytearray(raw[y * (stride + 1) + 1 : (y + 1) * (stride + 1)]),
        )
        for i in range(stride):
            left = line[i - channels] if i >= channels else 0
            up, corner = previous[i], previous[i - channels] if i >= channels else 0
            if kind == 1:
                line[i] = (line[i] + left) & 255
            elif kind == 2:
                line[i] = (line[i] + up) & 255
            elif kind == 3:
                line[i] = (line[i] + (left + up) // 2) & 255
            elif kind == 4:
                p = left + up - corner
                pa, pb, pc = abs(p - left), abs(p - up), abs(p - corner)
                line[i] = (
                    line[i] + (left if pa <= pb and pa <= pc else up if pb <= pc else corner)
                ) & 255
        rows.append(line)
        previous = line
    pixels = [tuple(row[x * channels : x * channels + 3]) for row in rows for x in range(width)]
    return width, height, pixels  # type: ignore[return-value]


def test_chromium_renders_the_report_with_its_matrix_diagrams_and_charts(demo, tmp_path):
    binary = _chromium()
    from charter.tools.report import AuditStats

    stats = AuditStats(calls=9, denials=[("invoice.approve", 4), ("invoice.pay", 1)],
                       impersonation=[("sam → alice", 2)], replays=[("invoice.create", 3)],
                       actors=[("alice", 7), ("bob", 2)])  # fmt: skip
    page = tmp_path / "report.html"
    page.write_text(_page(demo, stats))
    dom = _run_chromium(binary, "--dump-dom", page.as_uri())
    assert 0 == dom.returncode, dom.stderr[-2000:]
    text = dom.stdout
    assert "charter.demo: security model" in text
    for heading in (
        "Action catalogue",
        "Permission matrix",
        "Workflows",
        "Route coverage",
        "Audit statistics",
        "Denials per action",
        "Actors with the most calls",
    ):
        assert heading in text  # fmt: skip
    assert text.count('class="workflow"') == 3  # invoices, plan upgrades, support sessions
    assert ">payment_pending</text>" in text
    # The screenshot shows what a reader sees of the matrix, the diagrams and the charts (the
    # long catalogue and coverage tables are hidden in this copy so that they fit one image).
    focused = tmp_path / "focused.html"
    focused.write_text(
        page.read_text().replace("</style>", "#catalogue,#coverage{display:none}</style>", 1)
    )
    shot = tmp_path / "shot.png"
    result = _run_chromium(binary, f"--screenshot={shot}", "--window-size=1280,5000",
                           "--force-device-scale-factor=0.5", focused.as_uri())  # fmt: skip
    assert 0 == result.returncode, result.stderr[-2000:]
    width, height, pixels = _pixels(shot.read_bytes())
    assert (640, 2500) == (width, height)
    counts = Counter(pixels)
    assert len(counts) > 50  # text, tables, diagrams: not a blank page
    on_screen = {
        "an allow cell": (0xC8, 0xEC, 0xD0),
        "a deny cell": (0xF6, 0xC9, 0xC9),
        "a conditional cell": (0xFD, 0xE9, 0xB6),
        "a workflow state": (0xDB, 0xE7, 0xFF),
        "a final state": (0xE4, 0xE0, 0xF5),
        "a chart's bar": (0x2F, 0x5B, 0xB7),
    }
    missing = [name for name, rgb in on_screen.items() if counts[rgb] < 100]
    assert [] == missing, f"not on the screen: {missing}"
