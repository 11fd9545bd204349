"""The public surface is deliberate: adding or removing a name is a visible change."""

from __future__ import annotations

import charter


def test_the_public_names_are_pinned_and_sorted():
    expected = [
        "A", "ActionContext", "ActionPolicy", "ActionSpec", "Actor", "ActorKind", "Agent",
        "AuditProblem",
        "BatchEmpty", "BatchFailed", "BatchItem", "BatchOutcome", "BatchTooLarge", "BulkMode",
        "BulkUnsupported",
        "C", "Channel", "Charter", "CharterError", "ConfigurationError", "ConfirmationExpired",
        "ConfirmationForbidden", "ConfirmationNotPending", "Conflict", "Decision",
        "DecisionKind", "DomainError", "ExportStream", "Forbidden", "HandlerFailed", "HoldExpired",
        "IdempotencyKeyInProgress",
        "IdempotencyKeyInvalid", "IdempotencyKeyMissing", "IdempotencyKeyReused",
        "IdempotencyKeyUnsupported", "IdempotencyMode", "ImpersonationSessions",
        "InsufficientCredits", "InvalidAmount",
        "InvalidCursor", "InvalidInput", "InvalidTransition", "NoInput", "NotFound", "Outcome",
        "Page", "PolicySet",
        "PreconditionFailed", "QuotaExceeded", "R", "RateLimited", "ReasonRequired", "ResourceSpec",
        "Rule",
        "StepExpired", "StorageUnavailable", "ToolDefinition", "Transition", "Unauthenticated",
        "UnknownAction",
        "VerificationReport", "Workflow",
    ]  # fmt: skip
    assert expected == charter.__all__
    assert sorted(charter.__all__) == charter.__all__
    for name in charter.__all__:
        assert getattr(charter, name) is not None


def test_every_error_has_a_stable_code_and_an_http_status():
    errors = [
        getattr(charter, n)
        for n in charter.__all__
        if n.endswith(
            (
                "Error",
                "Missing",
                "Invalid",
                "Reused",
                "InProgress",
                "Required",
                "Found",
                "Forbidden",
                "Failed",
                "Unavailable",
                "Unauthenticated",
                "Conflict",
                "Input",
                "Action",
            )
        )
    ]
    codes = set()
    for error in errors:
        if isinstance(error, type) and issubclass(error, charter.CharterError):
            assert error.code
            assert error.code == error.code.lower()
            assert 400 <= error.status <= 599
            codes.add(error.code)
    assert len(codes) >= 15


def test_the_package_ships_type_information():
    from importlib.resources import files

    assert files("charter").joinpath("py.typed").is_file()
