"""The verifier process: answers ``VerifyCredential`` and ``CheckImage`` on NATS.

The handlers read the raw message and validate it here, because a pydantic
error message quotes the input it rejected, and that input holds the secret.
"""

import json
import time
import traceback

import structlog
from faststream import FastStream
from faststream.nats import NatsBroker
from faststream.nats.annotations import NatsMessage
from pydantic import ValidationError

from contracts.commands import CheckImage, VerifyCredential
from contracts.errors import ErrorCode, RegistryError
from contracts.replies import ImageCheck, Verification
from contracts.subjects import CHECK_IMAGE, VERIFY_CREDENTIAL
from services.backbone.logging import configure_logging
from services.backbone.settings import Settings
from services.registry.client import TokenCache
from services.registry.guard import AddressGuard
from services.registry.protocol import clean_text
from services.registry.refusals import Redactor
from services.verifier.handlers import verify_credential
from services.verifier.images import check_image

QUEUE = "verifier"

log = structlog.get_logger(__name__)


def build_app(settings: Settings) -> tuple[FastStream, NatsBroker]:
    """The composition root: one guard and one token cache per process."""
    guard = AddressGuard.from_settings(settings)
    tokens = TokenCache()
    servers = [url.strip() for url in settings.nats_url.split(",") if url.strip()]
    # FastStream's own logger would print exception messages: we log instead.
    broker = NatsBroker(servers, name="crabglamp-verifier", logger=None)
    app = FastStream(broker, logger=None)

    @broker.subscriber(VERIFY_CREDENTIAL, queue=QUEUE)
    async def on_verify_credential(message: NatsMessage) -> Verification:
        return await answer(message.body, settings, tokens=tokens, guard=guard)

    @broker.subscriber(CHECK_IMAGE, queue=QUEUE)
    async def on_check_image(message: NatsMessage) -> ImageCheck:
        return await answer_check_image(
            message.body, settings, tokens=tokens, guard=guard
        )

    @app.after_startup
    async def ready() -> None:
        log.info(
            "verifier ready", subjects=[VERIFY_CREDENTIAL, CHECK_IMAGE], queue=QUEUE
        )

    return app, broker


async def run(settings: Settings) -> None:
    """Serve until stopped by a signal."""
    configure_logging("verifier", settings.log_format, settings.log_level)
    app, _ = build_app(settings)
    await app.run()


async def answer(
    body: bytes,
    settings: Settings,
    *,
    tokens: TokenCache | None = None,
    guard: AddressGuard | None = None,
) -> Verification:
    """Decode one request and verify it; every outcome is a ``Verification``."""
    try:
        cmd = VerifyCredential.model_validate_json(body)
    except ValidationError as exc:
        problems = _problems(exc, "verify")
        log.warning("verify request invalid", problems=problems)
        return _refused(_field_of(body, "registry"), "invalid_request", problems)
    bound = log.bind(registry=cmd.registry)
    started = time.monotonic()
    try:
        verification = await verify_credential(
            cmd, settings, tokens=tokens, guard=guard
        )
    except Exception as exc:
        # Only the frames and the type: a message could quote what was parsed.
        bound.error(
            "verification crashed",
            error_type=type(exc).__name__,
            frames="".join(traceback.format_tb(exc.__traceback__)),
        )
        return _refused(
            cmd.registry, "internal_error", "The verifier failed; try again."
        )
    error = verification.error
    bound.info(
        "verification answered",
        outcome=verification.outcome,
        code=error.code if error else None,
        registry_status=error.registry_status if error else None,
        elapsed_ms=round((time.monotonic() - started) * 1000),
    )
    return verification


async def answer_check_image(
    body: bytes,
    settings: Settings,
    *,
    tokens: TokenCache | None = None,
    guard: AddressGuard | None = None,
) -> ImageCheck:
    """Decode one image check request and run it; every outcome is an answer."""
    try:
        cmd = CheckImage.model_validate_json(body)
    except ValidationError as exc:
        problems = _problems(exc, "image check")
        log.warning("image check request invalid", problems=problems)
        error = RegistryError(code="invalid_request", registry="", explanation=problems)
        image = _field_of(body, "image")
        return ImageCheck(outcome="rejected", image=image, error=error)
    image = Redactor(cmd.username, cmd.secret).text(cmd.image)
    bound = log.bind(image=image, anonymous=cmd.username is None)
    started = time.monotonic()
    try:
        check = await check_image(cmd, settings, tokens=tokens, guard=guard)
    except Exception as exc:
        # Only the frames and the type: a message could quote what was parsed.
        bound.error(
            "image check crashed",
            error_type=type(exc).__name__,
            frames="".join(traceback.format_tb(exc.__traceback__)),
        )
        error = RegistryError(
            code="internal_error",
            registry="",
            explanation="The verifier failed; try again.",
        )
        return ImageCheck(outcome="rejected", image=image, error=error)
    refusal = check.error
    bound.info(
        "image check answered",
        outcome=check.outcome,
        code=refusal.code if refusal else None,
        registry_status=refusal.registry_status if refusal else None,
        digest=check.digest,
        elapsed_ms=round((time.monotonic() - started) * 1000),
    )
    return check


def _problems(exc: ValidationError, request: str) -> str:
    """What is wrong with a request, by field, without the values themselves."""
    parts = [
        f"{'.'.join(str(loc) for loc in error['loc']) or 'body'}: {error['msg']}"
        for error in exc.errors(include_url=False, include_input=False)
    ]
    return f"The {request} request is invalid: " + "; ".join(parts[:5]) + "."


def _field_of(body: bytes, name: str) -> str:
    """One string field of a request that failed validation, for the reply."""
    try:
        data = json.loads(body)
    except (ValueError, RecursionError):
        return ""
    value = data.get(name) if isinstance(data, dict) else None
    return clean_text(value, 255) if isinstance(value, str) else ""


def _refused(registry: str, code: ErrorCode, explanation: str) -> Verification:
    error = RegistryError(code=code, registry=registry, explanation=explanation)
    return Verification(outcome="rejected", registry=registry, error=error)
