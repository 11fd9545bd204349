"""Declarations fail at start-up with a message that says what to fix."""

from __future__ import annotations

import pytest
from pydantic import BaseModel, ConfigDict

from charter import Charter, ConfigurationError
from charter.demo.models import Invoice


class Loose(BaseModel):  # ignores unknown fields: a mass-assignment hazard
    amount: int = 0


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")
    invoice_id: int = 0


def handler(ctx, record, data):
    return None


@pytest.fixture
def charter() -> Charter:
    instance = Charter(database_url="sqlite://", development=True)
    instance.resource(Invoice, tenant="tenant_id", state="state", version="version")
    return instance


def test_an_action_declared_twice_is_refused(charter):
    charter.action("invoice.get", on=Invoice, sensitive_read=True)(handler)
    with pytest.raises(ConfigurationError, match="declared twice"):
        charter.action("invoice.get", on=Invoice, sensitive_read=True)(handler)


def test_an_input_model_that_accepts_unknown_fields_is_refused(charter):
    with pytest.raises(ConfigurationError, match=r"extra=.forbid."):
        charter.action("invoice.edit", on=Invoice, input=Loose)(handler)


@pytest.mark.parametrize("name", ["approve", "Invoice.Approve", "invoice..x", "x" * 200])
def test_malformed_action_names_are_refused(charter, name):
    with pytest.raises(ConfigurationError, match=r"resource\.verb"):
        charter.action(name, on=Invoice)(handler)


def test_an_undeclared_resource_is_refused(charter):
    class Other(Invoice):
        pass

    with pytest.raises(ConfigurationError, match="not a declared resource"):
        charter.action("other.get", on=Other)(handler)


def test_a_resource_column_that_does_not_exist_is_refused():
    charter = Charter(database_url="sqlite://", development=True)
    with pytest.raises(ConfigurationError, match="tenant column 'org_id'"):
        charter.resource(Invoice, tenant="org_id")


def test_a_resource_declared_twice_is_refused(charter):
    with pytest.raises(ConfigurationError, match="declared twice"):
        charter.resource(Invoice, tenant="tenant_id")


def test_a_target_field_must_exist_in_the_input(charter):
    with pytest.raises(ConfigurationError, match="target field"):
        charter.register(
            "invoice.x",
            handler,
            on=Invoice,
            input=Strict,
            target="nope",
            allow=None,
            creates=False,
            reason_required=False,
            sensitive_read=False,
            scope=None,
            impersonation=True,
            listable=False,
            status=None,
        )


def test_a_sensitive_read_takes_no_idempotency_key(charter):
    with pytest.raises(ConfigurationError, match="sensitive read"):
        charter.action("invoice.peek", on=Invoice, sensitive_read=True, idempotency="required")(
            handler
        )


def test_audit_keys_are_required_outside_development():
    with pytest.raises(ConfigurationError, match="audit_keys"):
        Charter(database_url="sqlite://")
    with pytest.raises(ConfigurationError, match="development audit key"):
        Charter(
            database_url="sqlite://", audit_keys={"k": "charter-development-audit-key-not-secret"}
        )


def test_the_reference_app_is_importable_as_charter_demo_app(monkeypatch, tmp_path):
    import importlib

    monkeypatch.setenv("CHARTER_ENV", "development")
    monkeypatch.setenv("CHARTER_DATABASE_URL", f"sqlite:///{tmp_path / 'demo.db'}")
    demo = importlib.import_module("charter.demo")
    monkeypatch.delitem(demo.__dict__, "app", raising=False)
    app = demo.app
    assert "/healthz" in {route.path for route in app.routes}
    monkeypatch.delitem(demo.__dict__, "app")
