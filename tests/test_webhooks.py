"""Webhook signatures: Standard Webhooks and Stripe-style, checked against the official vectors."""

from __future__ import annotations

import json
import pickle
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from charter.errors import (
    CharterError,
    ConfigurationError,
    Conflict,
    DomainError,
    Forbidden,
    HandlerFailed,
    InvalidInput,
    NotFound,
    PayloadTooLarge,
    PreconditionFailed,
    StorageError,
    StorageUnavailable,
)
from charter.idempotency import IdempotencyKeyInProgress, IdempotencyKeyReused
from charter.webhooks import (
    StandardWebhookSigner,
    StandardWebhookVerifier,
    StripeSignatureSigner,
    StripeSignatureVerifier,
    VerifiedWebhook,
    WebhookError,
    WebhookHeadersMissing,
    WebhookMalformed,
    WebhookPayloadTooLarge,
    WebhookReplayed,
    WebhookRetryLater,
    WebhookSignatureInvalid,
    WebhookTimestampStale,
    claim_once,
    generate_secret,
)

VECTORS_PATH = Path(__file__).resolve().parents[2] / "shared" / "vectors" / "webhooks.json"
VECTORS: dict[str, Any] | None = (
    json.loads(VECTORS_PATH.read_text("utf-8")) if VECTORS_PATH.is_file() else None
)
needs_vectors = pytest.mark.skipif(VECTORS is None, reason=f"vectors not found at {VECTORS_PATH}")


def sw(name: str) -> Any:
    """One entry of the Standard Webhooks vectors (an empty list when the file is missing)."""
    return VECTORS["standard_webhooks"][name] if VECTORS else []


def clock_at(epoch: int) -> Callable[[], datetime]:
    return lambda: datetime.fromtimestamp(epoch, UTC)


SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
MSG_ID = "msg_p5jXN8AQM9LWM0D4loKWxJek"
TS = 1614265330
BODY = b'{"test": 2432232314}'
REAL_SIGNATURE = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="


def headers(
    signature: str = REAL_SIGNATURE, *, ts: str = str(TS), msg_id: str = MSG_ID
) -> dict[str, str]:
    return {"webhook-id": msg_id, "webhook-timestamp": ts, "webhook-signature": signature}


def verifier(*secrets: str, now: int = TS, **kwargs: Any) -> StandardWebhookVerifier:
    return StandardWebhookVerifier(list(secrets or [SECRET]), clock=clock_at(now), **kwargs)


# ------------------------------------------------------------------ official vectors


@needs_vectors
def test_vector_sign_produces_the_expected_signature() -> None:
    case = sw("sign")
    signer = StandardWebhookSigner(case["secret"])
    body = case["payload"].encode()
    assert case["expected_signature"] == signer.signature(case["msg_id"], case["timestamp"], body)
    assert {
        "webhook-id": case["msg_id"],
        "webhook-timestamp": str(case["timestamp"]),
        "webhook-signature": case["expected_signature"],
    } == signer.sign(case["msg_id"], case["timestamp"], body)


@needs_vectors
def test_vector_signed_message_verifies() -> None:
    case = sw("sign")
    body = case["payload"].encode()
    signed = headers(case["expected_signature"], ts=str(case["timestamp"]), msg_id=case["msg_id"])
    result = StandardWebhookVerifier(case["secret"], clock=clock_at(case["timestamp"])).verify(
        signed, body
    )
    assert result == VerifiedWebhook(
        id=case["msg_id"],
        timestamp=datetime.fromtimestamp(case["timestamp"], UTC),
        body=body,
        scheme="standard-webhooks",
        expires_at=datetime.fromtimestamp(case["timestamp"] + 300, UTC),
    )


@pytest.mark.parametrize("secret", sw("secret_forms_that_must_be_equivalent"))
def test_vector_secret_forms_are_equivalent(secret: str) -> None:
    case = sw("sign")
    signer = StandardWebhookSigner(secret)
    body = case["payload"].encode()
    assert case["expected_signature"] == signer.signature(case["msg_id"], case["timestamp"], body)
    assert verifier(secret).is_valid(headers(case["expected_signature"]), body)


@pytest.mark.parametrize("secret", sw("unpadded_secrets_that_must_be_accepted"))
@pytest.mark.parametrize("prefix", ["", "whsec_"])
def test_vector_unpadded_secrets_are_accepted(secret: str, prefix: str) -> None:
    signed = StandardWebhookSigner(prefix + secret).sign(MSG_ID, TS, BODY)
    assert verifier(prefix + secret).verify(signed, BODY).id == MSG_ID


@pytest.mark.parametrize("secret", sw("empty_secrets_rejected_at_construction"))
def test_vector_empty_secrets_are_rejected_at_construction(secret: str) -> None:
    with pytest.raises(ConfigurationError):
        StandardWebhookVerifier(secret)
    with pytest.raises(ConfigurationError):
        StandardWebhookVerifier([SECRET, secret])
    with pytest.raises(ConfigurationError):
        StandardWebhookSigner(secret)
    with pytest.raises(ConfigurationError):
        StripeSignatureVerifier(secret)


@pytest.mark.parametrize("signature", sw("signatures_that_must_fail"))
def test_vector_bad_signatures_fail(signature: str) -> None:
    v = verifier()
    with pytest.raises(WebhookSignatureInvalid) as info:
        v.verify(headers(signature), BODY)
    assert (info.value.status, info.value.code) == (401, "webhook_signature_invalid")
    assert not v.is_valid(headers(signature), BODY)


@needs_vectors
def test_vector_multi_signature_header_passes_when_the_real_signature_is_present() -> None:
    separator = sw("multi_signature_header_separator")
    entries = sw("multi_signature_header_that_must_pass_when_the_real_signature_is_present")
    assert verifier().verify(headers(separator.join(entries)), BODY).id == MSG_ID
    without_real = [e for e in entries if e != REAL_SIGNATURE]
    assert not verifier().is_valid(headers(separator.join(without_real)), BODY)


@pytest.mark.parametrize("timestamp", sw("timestamps_that_must_fail"))
def test_vector_bad_timestamps_fail(timestamp: str) -> None:
    tolerance = sw("tolerance_seconds")
    now = TS
    if timestamp.startswith("now"):
        ts = now + int(timestamp[3:])
        # Correctly signed for that timestamp: only the clock may refuse it.
        signed = StandardWebhookSigner(SECRET).sign(MSG_ID, ts, BODY)
        expected: type[WebhookError] = WebhookTimestampStale
    else:
        signed = headers(ts=timestamp)
        expected = WebhookMalformed
    v = verifier(now=now, tolerance=timedelta(seconds=tolerance))
    with pytest.raises(expected):
        v.verify(signed, BODY)
    assert not v.is_valid(signed, BODY)


@needs_vectors
@pytest.mark.parametrize("offset", [-300, -1, 0, 1, 300])
def test_timestamps_within_the_tolerance_pass_in_both_directions(offset: int) -> None:
    signed = StandardWebhookSigner(SECRET).sign(MSG_ID, TS + offset, BODY)
    assert verifier(now=TS, tolerance=timedelta(seconds=sw("tolerance_seconds"))).is_valid(
        signed, BODY
    )


@needs_vectors
def test_vector_stripe_style_header_verifies() -> None:
    case = VECTORS["stripe_style"] if VECTORS else {}
    body = case["payload"].encode()
    v = StripeSignatureVerifier(
        case["secret"],
        clock=clock_at(case["timestamp"]),
        tolerance=timedelta(seconds=case["tolerance_seconds"]),
    )
    result = v.verify({"Stripe-Signature": case["header"]}, body)
    assert (None, datetime.fromtimestamp(case["timestamp"], UTC), body, "stripe") == (
        result.id,
        result.timestamp,
        result.body,
        result.scheme,
    )
    assert {"Stripe-Signature": case["header"]} == StripeSignatureSigner(case["secret"]).sign(
        case["timestamp"], body
    )
    assert case["signed_content"].encode() == f"{case['timestamp']}.".encode() + body


@needs_vectors
def test_vector_stripe_style_refuses_a_tampered_body_stale_time_or_wrong_secret() -> None:
    case = VECTORS["stripe_style"] if VECTORS else {}
    body = case["payload"].encode()
    hdrs = {"stripe-signature": case["header"]}
    ts = case["timestamp"]
    with pytest.raises(WebhookSignatureInvalid):
        StripeSignatureVerifier(case["secret"], clock=clock_at(ts)).verify(hdrs, body + b" ")
    with pytest.raises(WebhookSignatureInvalid):
        StripeSignatureVerifier("whsec_other", clock=clock_at(ts)).verify(hdrs, body)
    for now in (ts - 301, ts + 301):
        with pytest.raises(WebhookTimestampStale):
            StripeSignatureVerifier(case["secret"], clock=clock_at(now)).verify(hdrs, body)


# ------------------------------------------------------------------ Standard Webhooks behaviour


def test_header_names_are_case_insensitive() -> None:
    signed = {k.upper(): v for k, v in headers().items()}
    assert verifier().verify(signed, BODY).id == MSG_ID


def test_a_tampered_body_fails() -> None:
    with pytest.raises(WebhookSignatureInvalid):
        verifier().verify(headers(), BODY + b" ")


def test_a_changed_id_or_timestamp_fails() -> None:
    with pytest.raises(WebhookSignatureInvalid):
        verifier().verify(headers(msg_id="msg_other"), BODY)
    with pytest.raises(WebhookSignatureInvalid):
        verifier(now=TS).verify(headers(ts=str(TS + 1)), BODY)


def test_rotation_accepts_any_active_secret_in_order() -> None:
    old, new = generate_secret(), generate_secret()
    signed_with_old = StandardWebhookSigner(old).sign(MSG_ID, TS, BODY)
    assert verifier(new, old).is_valid(signed_with_old, BODY)
    assert not verifier(new).is_valid(signed_with_old, BODY)


def test_a_single_secret_string_is_one_secret_not_its_characters() -> None:
    assert StandardWebhookVerifier(SECRET, clock=clock_at(TS)).is_valid(headers(), BODY)


@pytest.mark.parametrize("secrets", [[], ["whsec_***"], ["whsec_a"], [b"whsec_abc"]])
def test_unusable_secrets_are_a_configuration_error(secrets: list[Any]) -> None:
    with pytest.raises(ConfigurationError):
        StandardWebhookVerifier(secrets)


def test_missing_headers_are_named() -> None:
    with pytest.raises(WebhookHeadersMissing) as info:
        verifier().verify({"webhook-id": MSG_ID}, BODY)
    assert (info.value.status, info.value.code) == (400, "webhook_headers_missing")
    assert info.value.attrs["missing"] == ["webhook-timestamp", "webhook-signature"]


def test_an_empty_header_counts_as_missing() -> None:
    with pytest.raises(WebhookHeadersMissing):
        verifier().verify(headers(signature=""), BODY)


def test_an_oversized_header_is_refused() -> None:
    v = verifier(max_header_length=200)
    with pytest.raises(WebhookMalformed):
        v.verify(headers(" ".join([REAL_SIGNATURE] * 10)), BODY)


def test_conflicting_duplicate_headers_are_refused() -> None:
    with pytest.raises(WebhookMalformed):
        verifier().verify({**headers(), "Webhook-Id": "msg_other"}, BODY)


@pytest.mark.parametrize("msg_id", ["msg with space", "x" * 257, "msg\u00e9"])
def test_an_unusable_id_is_malformed(msg_id: str) -> None:
    with pytest.raises(WebhookMalformed):
        verifier().verify(headers(msg_id=msg_id), BODY)


@pytest.mark.parametrize("ts", ["-1614265330", "+1614265330", " 1614265330", "1_614_265_330"])
def test_timestamps_must_be_plain_digits(ts: str) -> None:
    with pytest.raises(WebhookMalformed):
        verifier().verify(headers(ts=ts), BODY)


def test_a_huge_timestamp_is_stale_not_a_crash() -> None:
    with pytest.raises(WebhookTimestampStale):
        verifier().verify(headers(ts="9" * 16), BODY)


def test_the_body_limit_is_checked_before_anything_else() -> None:
    v = verifier(max_body_bytes=10)
    with pytest.raises(WebhookPayloadTooLarge) as info:
        v.verify({}, b"x" * 11)
    assert isinstance(info.value, PayloadTooLarge)
    assert (info.value.status, info.value.code) == (413, "payload_too_large")
    assert verifier(max_body_bytes=len(BODY)).is_valid(headers(), BODY)


def test_the_body_must_be_raw_bytes() -> None:
    with pytest.raises(TypeError):
        verifier().verify(headers(), BODY.decode())  # type: ignore[arg-type]


def test_the_clock_must_be_timezone_aware() -> None:
    v = StandardWebhookVerifier(SECRET, clock=lambda: datetime(2021, 2, 25, 15, 2, 10))
    with pytest.raises(ConfigurationError):
        v.verify(headers(), BODY)


def test_tolerance_is_configurable() -> None:
    signed = StandardWebhookSigner(SECRET).sign(MSG_ID, TS - 30, BODY)
    assert verifier(now=TS).is_valid(signed, BODY)
    assert not verifier(now=TS, tolerance=timedelta(seconds=10)).is_valid(signed, BODY)
    with pytest.raises(ConfigurationError):
        verifier(tolerance=timedelta(0))


def test_signing_accepts_an_aware_datetime() -> None:
    at = datetime.fromtimestamp(TS, UTC)
    assert StandardWebhookSigner(SECRET).sign(MSG_ID, at, BODY) == headers()


def test_signing_refuses_what_could_not_be_verified() -> None:
    signer = StandardWebhookSigner(SECRET)
    with pytest.raises(ValueError, match="msg_id"):
        signer.sign("has space", TS, BODY)
    with pytest.raises(ValueError, match="aware"):
        signer.sign(MSG_ID, datetime(2021, 1, 1), BODY)


def test_secrets_never_appear_in_reprs_and_cannot_be_pickled() -> None:
    key_part = SECRET.removeprefix("whsec_")
    objects = [
        verifier(),
        StandardWebhookSigner(SECRET),
        StripeSignatureVerifier(SECRET),
        StripeSignatureSigner(SECRET),
    ]
    for obj in objects:
        assert key_part not in repr(obj)
        assert "redacted" in repr(obj)
    with pytest.raises(TypeError):
        pickle.dumps(objects[0])


def test_error_codes_and_statuses_are_stable() -> None:
    assert {
        cls.__name__: (cls.code, cls.status)
        for cls in (
            WebhookError,
            WebhookHeadersMissing,
            WebhookMalformed,
            WebhookPayloadTooLarge,
            WebhookTimestampStale,
            WebhookSignatureInvalid,
            WebhookReplayed,
        )
    } == {
        "WebhookError": ("webhook_error", 400),
        "WebhookHeadersMissing": ("webhook_headers_missing", 400),
        "WebhookMalformed": ("webhook_malformed", 400),
        "WebhookPayloadTooLarge": ("payload_too_large", 413),
        "WebhookTimestampStale": ("webhook_timestamp_stale", 401),
        "WebhookSignatureInvalid": ("webhook_signature_invalid", 401),
        "WebhookReplayed": ("webhook_replayed", 409),
    }
    assert all(
        issubclass(cls, WebhookError) and issubclass(cls, CharterError)
        for cls in (WebhookReplayed, WebhookPayloadTooLarge)
    )


# ------------------------------------------------------------------ replay protection


class MemoryReplayStore:
    def __init__(self) -> None:
        self.claims: dict[tuple[str, str], datetime] = {}

    def claim(self, scope: str, webhook_id: str, *, expires_at: datetime) -> bool:
        if (scope, webhook_id) in self.claims:
            return False
        self.claims[scope, webhook_id] = expires_at
        return True


def test_claim_once_refuses_a_replayed_id_per_scope() -> None:
    store = MemoryReplayStore()
    webhook = verifier().verify(headers(), BODY)
    claim_once(store, webhook, scope="partner-a")
    with pytest.raises(WebhookReplayed) as info:
        claim_once(store, webhook, scope="partner-a")
    assert (info.value.status, info.value.attrs["webhook_id"]) == (409, MSG_ID)
    claim_once(store, webhook, scope="partner-b")
    assert datetime.fromtimestamp(TS + 300, UTC) == store.claims["partner-a", MSG_ID]


def test_a_stale_timestamp_is_refused_even_with_a_fresh_id() -> None:
    store = MemoryReplayStore()
    signed = StandardWebhookSigner(SECRET).sign("msg_never_seen", TS - 301, BODY)
    with pytest.raises(WebhookTimestampStale):
        claim_once(store, verifier(now=TS).verify(signed, BODY), scope="p")
    assert store.claims == {}


def test_claim_once_takes_the_event_id_for_stripe_style_webhooks() -> None:
    store = MemoryReplayStore()
    signed = StripeSignatureSigner("whsec_s").sign(TS, BODY)
    webhook = StripeSignatureVerifier("whsec_s", clock=clock_at(TS)).verify(signed, BODY)
    with pytest.raises(WebhookMalformed):
        claim_once(store, webhook, scope="stripe")
    claim_once(store, webhook, scope="stripe", webhook_id="evt_1")
    with pytest.raises(WebhookReplayed):
        claim_once(store, webhook, scope="stripe", webhook_id="evt_1")


# ------------------------------------------------------------------ Stripe-style behaviour


def test_stripe_several_v1_signatures_and_rotation() -> None:
    old, new = "whsec_old", "whsec_new"
    real = StripeSignatureSigner(old).sign(TS, BODY)["Stripe-Signature"]
    t, v1 = real.split(",")
    header = f"{t},v1={'0' * 64},{v1},v0=ignored"
    v = StripeSignatureVerifier([new, old], clock=clock_at(TS))
    assert v.is_valid({"STRIPE-SIGNATURE": header}, BODY)
    assert not StripeSignatureVerifier(new, clock=clock_at(TS)).is_valid(
        {"Stripe-Signature": header}, BODY
    )


@pytest.mark.parametrize(
    ("header", "error"),
    [
        ("v1=" + "0" * 64, WebhookMalformed),
        (f"t={TS},t={TS},v1={'0' * 64}", WebhookMalformed),
        ("t=hello,v1=" + "0" * 64, WebhookMalformed),
        (f"t={TS}", WebhookSignatureInvalid),
        (f"t={TS},v1=not-hex", WebhookSignatureInvalid),
        ("garbage", WebhookMalformed),
    ],
)
def test_stripe_malformed_headers_get_clean_errors(header: str, error: type[WebhookError]) -> None:
    with pytest.raises(error):
        StripeSignatureVerifier("whsec_s", clock=clock_at(TS)).verify(
            {"Stripe-Signature": header}, BODY
        )


def test_stripe_missing_header() -> None:
    with pytest.raises(WebhookHeadersMissing):
        StripeSignatureVerifier("whsec_s").verify({"webhook-id": "x"}, BODY)


# ------------------------------------------------------------------ properties

header_values = st.one_of(
    st.text(max_size=300),
    st.sampled_from([str(TS), REAL_SIGNATURE, "v1,", "v1", "t=1,v1=", MSG_ID, "9" * 40]),
    st.lists(
        st.sampled_from(["v1,", "v2,", "v1a,", "t=", "v1=", ",", " ", "=", "=="])
        | st.text(alphabet="abcdefABCDEF0123456789+/=", max_size=64),
        max_size=8,
    ).map("".join),
)
header_names = st.sampled_from(
    ["webhook-id", "Webhook-Timestamp", "WEBHOOK-SIGNATURE", "stripe-signature", "x-other"]
) | st.text(max_size=20)


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(
    hdrs=st.dictionaries(header_names, header_values, max_size=6),
    body=st.binary(max_size=600),
)
def test_only_webhook_errors_come_out_of_random_input(hdrs: dict[str, str], body: bytes) -> None:
    verifiers = [
        verifier(max_body_bytes=512),
        StripeSignatureVerifier("whsec_s", clock=clock_at(TS), max_body_bytes=512),
    ]
    for v in verifiers:
        error: WebhookError | None = None
        try:
            v.verify(hdrs, body)
        except WebhookError as exc:
            error = exc
        assert error is None or error.code.startswith("webhook_") or error.status == 413
        assert v.is_valid(hdrs, body) is (error is None)


@settings(max_examples=200)
@given(
    msg_id=st.text(alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1),
    offset=st.integers(min_value=-300, max_value=300),
    body=st.binary(max_size=2048),
)
def test_whatever_the_signer_signs_the_verifier_accepts(
    msg_id: str, offset: int, body: bytes
) -> None:
    msg_id = msg_id[:256]
    signed = StandardWebhookSigner(SECRET).sign(msg_id, TS + offset, body)
    assert verifier(now=TS).verify(signed, body).body == body


# -- transient or permanent: what a sender that retries on its own is told ------------------


@pytest.mark.parametrize(
    ("error", "transient", "permanent"),
    [
        (StorageUnavailable(), True, False),
        (IdempotencyKeyInProgress(), True, False),  # carries Retry-After
        (WebhookRetryLater(), True, False),
        (Forbidden(), False, True),
        (NotFound(), False, True),
        (InvalidInput(), False, True),
        (PreconditionFailed(), False, True),
        (Conflict(), False, True),  # a uniqueness rule: the same request meets it again
        (DomainError(), False, True),
        (IdempotencyKeyReused(), False, True),
        (HandlerFailed(), False, False),  # a crash: nothing was decided
        (StorageError(), False, False),
    ],
    ids=lambda value: type(value).__name__ if isinstance(value, CharterError) else None,
)
def test_every_error_is_transient_permanent_or_a_failure(error, transient, permanent):
    assert (transient, permanent) == (error.transient, error.permanent)


def test_a_conflict_that_says_when_to_come_back_is_transient():
    persisted = Conflict("kept colliding")
    persisted.headers["Retry-After"] = "1"  # as the gate raises a deadlock that persisted
    assert (True, False) == (persisted.transient, persisted.permanent)


def test_retry_later_wraps_a_transient_error_with_its_cause_and_retry_after():
    wrapped = WebhookRetryLater.of(IdempotencyKeyInProgress(retry_after=3))
    assert (503, "webhook_retry_later", "3") == (
        wrapped.status,
        wrapped.code,
        wrapped.headers["Retry-After"],
    )
    assert "idempotency_key_in_progress" == wrapped.problem()["cause"]
