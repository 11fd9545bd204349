"""An export's memory stays flat: a 100,000-row export peaks within 15 MB of a 10,000-row one.

Measured as the peak RSS (``ru_maxrss``) of a fresh subprocess, which exports
10,000 rows first and then 100,000 (SQLite: its cursor is read in chunks).
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

SCRIPT = textwrap.dedent(
    """
    import json, resource, sys
    from sqlalchemy import text
    from charter import Actor, Charter
    from charter.demo.service import build_charter
    from charter.migrate import upgrade
    from charter.demo.app import DEMO_MIGRATIONS

    charter = Charter(database_url=sys.argv[1], development=True, rate_limits=None,
                      checkpoint_interval=None)
    upgrade(charter.engine, extra_locations=DEMO_MIGRATIONS)
    build_charter(charter)
    with charter.engine.begin() as conn:  # seeded in SQL: no Python rows to inflate the peak
        for tenant, n in (("small", 10_000), ("large", 100_000)):
            conn.execute(text(
                "INSERT INTO invoices (tenant_id, customer, amount, currency, state, version, "
                "created_by, created_at) WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL "
                "SELECT i + 1 FROM n WHERE i < :n) SELECT :t, 'customer ' || i, i % 1000, "
                "'EUR', 'draft', 1, 'u', '2026-01-01 00:00:00.000000' FROM n"),
                {"n": n, "t": tenant})

    def peak(tenant):
        actor = Actor.make("u", tenant, roles={"member"}, scopes={"invoices:read"})
        size = 0
        with charter.export(actor, "invoice.export", format="csv") as stream:
            for chunk in stream:
                size += len(chunk)
        assert stream.status == "completed", stream.status
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, stream.rows

    small, small_rows = peak("small")
    large, large_rows = peak("large")
    charter.close()
    print(json.dumps({"small": small, "large": large, "rows": [small_rows, large_rows]}))
    """
)


def test_a_100k_row_export_peaks_within_15_mb_of_a_10k_row_export(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'memory.db'}"
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT, url],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert 0 == done.returncode, done.stderr[-2000:]
    figures = json.loads(done.stdout.strip().splitlines()[-1])
    assert [10_000, 100_000] == figures["rows"]
    assert figures["large"] - figures["small"] < 15, figures
