"""Issue 9, section 7: the CLI and the reference service, as a new user runs them.

Each test runs the ``charter`` command the way a user does (the console script
in a subprocess, or the Typer app) and fails on the code as it was.
"""

from __future__ import annotations

import dataclasses
import os
import re
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest
from sqlalchemy import inspect, select, update
from typer.testing import CliRunner

from charter import Charter
from charter.cli import app
from charter.demo.models import Invoice
from charter.demo.payment_client import PaymentClient
from charter.demo.payments import PaymentProviderStub, PaymentProviderUnavailable
from charter.demo.service import DEMO_USERS, build_charter
from charter.idempotency import idempotency_table
from charter.migrate import upgrade
from charter.storage import make_engine

CHARTER = str(Path(sys.executable).parent / "charter")
runner = CliRunner()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _clean_env(**extra: str) -> dict[str, str]:
    """The environment without Charter's settings (and without ``PYTHONPATH=.``)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CHARTER_")}
    if env.get("PYTHONPATH", "") in (".", ""):
        env.pop("PYTHONPATH", None)
    return {**env, **extra}


def test_make_demo_with_a_database_url_serves_instead_of_crashing(tmp_path):
    port = _free_port()
    env = _clean_env(
        CHARTER_ENV="development", CHARTER_DATABASE_URL=f"sqlite:///{tmp_path / 'demo.db'}"
    )
    log = (tmp_path / "demo.log").open("wb")
    proc = subprocess.Popen(
        [CHARTER, "demo", "--port", str(port)], env=env, stdout=log, stderr=subprocess.STDOUT
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            assert proc.poll() is None, (tmp_path / "demo.log").read_text()  # was: IndexError
            try:
                health = httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1)
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline, "charter demo did not answer /healthz"
                time.sleep(0.1)
        assert (200, "up") == (health.status_code, health.json()["database"])
        # The service it serves is the reference service as configured: rate limited too.
        token = re.search(r"export ALICE=(\S+)", (tmp_path / "demo.log").read_text())
        assert token is not None
        created = httpx.post(
            f"http://127.0.0.1:{port}/invoices",
            json={"customer": "ACME", "amount": "1.00"},
            headers={"Authorization": f"Bearer {token.group(1)}"},
            timeout=5,
        )
        assert 201 == created.status_code, created.text
        assert "ratelimit" in created.headers  # was: charter demo ran without rate limits
    finally:
        proc.terminate()
        proc.wait(timeout=20)
        log.close()


@pytest.fixture
def abandoned_payment(tmp_path) -> Iterator[tuple[str, PaymentProviderStub, int]]:
    """An invoice.pay whose worker lost the provider's answer, its lease since expired."""
    url = f"sqlite:///{tmp_path / 'resume.db'}"
    with PaymentProviderStub() as stub:
        assert stub.base_url is not None
        payments = PaymentClient(stub.base_url)
        charter = build_charter(Charter(database_url=url, development=True), payments=payments)
        try:
            upgrade(charter.engine, extra_locations=["charter.demo:migrations"])
            users = {  # with a credential's scopes, as the HTTP adapter would give them
                uid: dataclasses.replace(actor, scopes=frozenset({"*"}))
                for (_, uid), actor in DEMO_USERS.items()
            }
            created = charter.execute(
                users["alice"], "invoice.create", {"customer": "ACME", "amount": "10"}
            )
            invoice = int(created.body["id"])
            charter.execute(users["alice"], "invoice.submit", target=invoice)
            charter.execute(users["bob"], "invoice.approve", target=invoice)
            stub.inject_faults(fail_next=1)  # the provider charges; the answer is lost
            with pytest.raises(PaymentProviderUnavailable):
                charter.execute(users["carol"], "invoice.pay", target=invoice, key="pay-1")
            with charter.engine.begin() as conn:  # the worker died: its lease ran out
                conn.execute(
                    update(idempotency_table).values(
                        locked_until=datetime.now(UTC) - timedelta(minutes=1)
                    )
                )
            yield url, stub, invoice
        finally:
            payments.close()
            charter.engine.dispose()


def test_idempotency_resume_keeps_the_payment_provider(abandoned_payment, monkeypatch):
    url, stub, invoice = abandoned_payment
    assert stub.base_url is not None
    monkeypatch.setenv("CHARTER_ENV", "development")
    monkeypatch.setenv("CHARTER_PAYMENTS_URL", stub.base_url)
    result = runner.invoke(app, ["idempotency", "resume", "--demo", "--database-url", url])
    assert 0 == result.exit_code, result.output
    assert "pay-1: completed" in result.output
    assert "resumed 1" in result.output
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            charge_id = conn.execute(select(Invoice.charge_id).where(Invoice.id == invoice))
            assert charge_id.scalar_one() is not None
    finally:
        engine.dispose()
    assert 1 == stub.stats()["charges_created"]  # the step replayed its key: no second charge


def test_db_upgrade_migrates_charters_tables_not_the_reference_services(tmp_path, monkeypatch):
    monkeypatch.setenv("CHARTER_ENV", "development")
    url = f"sqlite:///{tmp_path / 'fresh.db'}"
    assert 0 == runner.invoke(app, ["db", "upgrade", "--database-url", url]).exit_code
    engine = make_engine(url)
    try:
        tables = set(inspect(engine).get_table_names())
    finally:
        engine.dispose()
    assert "charter_audit" in tables
    assert not {"invoices"} & tables  # was: the demo's invoices table too


def test_the_cli_runs_without_the_reference_service_importable(tmp_path):
    url = f"sqlite:///{tmp_path / 'x.db'}"
    script = textwrap.dedent(
        f"""
        import sys
        sys.modules["charter.demo"] = None  # importing it now raises ImportError
        from charter.cli import app
        for argv in (["--help"], ["db", "upgrade", "--database-url", {url!r}]):
            try:
                app(argv)
            except SystemExit as exit:
                assert exit.code in (0, None), (argv, exit.code)
        assert not any(m.startswith("charter.demo") for m in sys.modules if sys.modules[m])
        print("ok")
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script],
        env=_clean_env(CHARTER_ENV="development"),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert (0, "ok") == (result.returncode, result.stdout.split()[-1]), result.stderr
