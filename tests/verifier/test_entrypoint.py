"""The verifier process over a real NATS server, and what it logs."""

import logging
from collections.abc import AsyncIterator

import nats
import pytest
import structlog
from nats.aio.client import Client as NATS

from contracts.commands import CheckImage, VerifyCredential
from contracts.replies import ImageCheck, Verification
from contracts.subjects import CHECK_IMAGE, VERIFY_CREDENTIAL
from services.backbone.settings import Settings
from services.verifier.entrypoint import answer, answer_check_image, build_app
from tests.support.registry import LocalRegistry, push_image

SECRET = "Zq8-unique-secret-value"


@pytest.fixture
async def verifier(nats_url: str, registry_basic: LocalRegistry) -> AsyncIterator[NATS]:
    """A running verifier and a client connection to ask it."""
    settings = Settings(
        nats_url=nats_url,
        insecure_registries=[registry_basic.host],
        allow_registries=["127.0.0.1"],
    )
    _, broker = build_app(settings)
    async with broker:
        await broker.start()
        client = await nats.connect(nats_url)
        try:
            yield client
        finally:
            await client.drain()


async def ask(client: NATS, payload: bytes) -> Verification:
    reply = await client.request(VERIFY_CREDENTIAL, payload, timeout=10)
    return Verification.model_validate_json(reply.data)


async def test_a_verification_is_answered_over_nats(
    verifier: NATS, registry_basic: LocalRegistry
) -> None:
    cmd = VerifyCredential(
        registry=registry_basic.host, username="alice", secret="alice-pass"
    )
    verification = await ask(verifier, cmd.model_dump_json().encode())
    assert verification == Verification(
        outcome="accepted", registry=registry_basic.host
    )


async def test_a_rejection_is_answered_over_nats(
    verifier: NATS, registry_basic: LocalRegistry
) -> None:
    cmd = VerifyCredential(
        registry=registry_basic.host, username="alice", secret=SECRET
    )
    reply = await verifier.request(
        VERIFY_CREDENTIAL, cmd.model_dump_json().encode(), timeout=10
    )
    verification = Verification.model_validate_json(reply.data)
    assert verification.error is not None
    assert verification.error.code == "credential_rejected"
    assert SECRET.encode() not in reply.data


@pytest.mark.parametrize(
    "payload",
    [
        b'{"registry": "ghcr.io", "username": "u", "secret": "%s", "extra": 1}',
        b'{"registry": "ghcr.io", "username": "u", "secret": "%s"' + b"x" * 70000,
        b'{"registry": "ghcr.io", "username": "u", "secret": "%s'
        + b"x" * 70000
        + b'"}',
        b"not json at all %s",
    ],
)
async def test_an_invalid_request_is_answered_without_echoing_it(
    verifier: NATS, payload: bytes
) -> None:
    verification = await ask(verifier, payload.replace(b"%s", SECRET.encode()))
    assert verification.outcome == "rejected"
    assert verification.error is not None
    assert verification.error.code == "invalid_request"
    assert verification.error.explanation.startswith("The verify request is invalid")
    assert SECRET not in verification.model_dump_json()


async def test_logs_bind_registry_and_outcome_and_never_the_secret(
    registry_basic: LocalRegistry, caplog: pytest.LogCaptureFixture
) -> None:
    settings = Settings(
        insecure_registries=[registry_basic.host], allow_registries=["127.0.0.1"]
    )
    cmd = VerifyCredential(
        registry=registry_basic.host, username="alice", secret=SECRET
    )
    too_long = b'{"registry": "r", "username": "u", "secret": "%s' % SECRET.encode()
    with caplog.at_level(logging.DEBUG), structlog.testing.capture_logs() as logs:
        await answer(cmd.model_dump_json().encode(), settings)
        await answer(too_long + b"x" * 70000 + b'"}', settings)
        await answer(b"garbage " + SECRET.encode(), settings)
    verified = next(
        entry for entry in logs if entry["event"] == "verification answered"
    )
    assert verified["registry"] == registry_basic.host
    assert verified["outcome"] == "rejected"
    assert verified["code"] == "credential_rejected"
    assert [entry["event"] for entry in logs].count("verify request invalid") == 2
    assert SECRET not in repr(logs)
    assert SECRET not in caplog.text


async def test_an_image_check_is_answered_over_nats(
    verifier: NATS, registry_basic: LocalRegistry
) -> None:
    pushed = push_image(registry_basic, "entrypoint/app", "v1")
    cmd = CheckImage(
        image=f"{registry_basic.host}/entrypoint/app:v1",
        username="alice",
        secret="alice-pass",
    )
    reply = await verifier.request(
        CHECK_IMAGE, cmd.model_dump_json().encode(), timeout=10
    )
    check = ImageCheck.model_validate_json(reply.data)
    assert check.outcome == "accepted"
    assert check.digest == pushed.digest
    assert check.platforms == ["linux/amd64"]


async def test_a_refused_image_check_never_echoes_the_secret(
    verifier: NATS, registry_basic: LocalRegistry
) -> None:
    cmd = CheckImage(
        image=f"{registry_basic.host}/entrypoint/app:v1",
        username="alice",
        secret=SECRET,
    )
    reply = await verifier.request(
        CHECK_IMAGE, cmd.model_dump_json().encode(), timeout=10
    )
    check = ImageCheck.model_validate_json(reply.data)
    assert check.error is not None
    assert check.error.code == "credential_rejected"
    assert SECRET.encode() not in reply.data


@pytest.mark.parametrize(
    "payload",
    [
        b'{"image": "team/app", "username": "u", "secret": "%s", "extra": 1}',
        b'{"image": "team/app", "username": "u", "secret": "%s' + b"x" * 70000 + b'"}',
        b'{"username": "u", "secret": "%s"}',
        b"not json at all %s",
    ],
)
async def test_an_invalid_image_check_request_is_answered_without_echoing_it(
    verifier: NATS, payload: bytes
) -> None:
    reply = await verifier.request(
        CHECK_IMAGE, payload.replace(b"%s", SECRET.encode()), timeout=10
    )
    check = ImageCheck.model_validate_json(reply.data)
    assert check.outcome == "rejected"
    assert check.error is not None
    assert check.error.code == "invalid_request"
    assert check.error.explanation.startswith("The image check request is invalid")
    assert SECRET.encode() not in reply.data


async def test_image_check_logs_bind_the_image_and_never_the_secret(
    registry_basic: LocalRegistry, caplog: pytest.LogCaptureFixture
) -> None:
    settings = Settings(
        insecure_registries=[registry_basic.host], allow_registries=["127.0.0.1"]
    )
    image = f"{registry_basic.host}/entrypoint/app:v1"
    cmd = CheckImage(image=image, username="alice", secret=SECRET)
    with caplog.at_level(logging.DEBUG), structlog.testing.capture_logs() as logs:
        await answer_check_image(cmd.model_dump_json().encode(), settings)
        await answer_check_image(b"garbage " + SECRET.encode(), settings)
    answered = next(entry for entry in logs if entry["event"] == "image check answered")
    assert answered["image"] == image
    assert answered["outcome"] == "rejected"
    assert answered["code"] == "credential_rejected"
    assert [entry["event"] for entry in logs].count("image check request invalid") == 1
    assert SECRET not in repr(logs)
    assert SECRET not in caplog.text
