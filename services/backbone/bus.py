"""Request/reply between services with typed commands and replies."""

from collections.abc import Awaitable, Callable
from typing import TypeVar

import structlog
from faststream.nats.annotations import NatsMessage
from nats.aio.client import Client as NATS
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeoutError
from pydantic import BaseModel, ValidationError

from services.backbone.errors import ServiceUnavailableError

R = TypeVar("R", bound=BaseModel)
C = TypeVar("C", bound=BaseModel)
log = structlog.get_logger(__name__)


async def request(
    nc: NATS, subject: str, command: BaseModel, reply_type: type[R], timeout_s: float
) -> R:
    """Send a command and parse its reply; no answer in time is an error."""
    payload = command.model_dump_json().encode()
    try:
        message = await nc.request(
            subject,
            payload,
            timeout=timeout_s,
            headers={"content-type": "application/json"},
        )
    except NoRespondersError as exc:
        raise ServiceUnavailableError(f"no service is serving {subject}") from exc
    except NatsTimeoutError as exc:
        raise ServiceUnavailableError(
            f"{subject} did not answer within {timeout_s:g} s"
        ) from exc
    return reply_type.model_validate_json(message.data)


def decode(model: type[R], body: bytes) -> R | str:
    """The command in ``body``, or a sentence on what is wrong with it.

    The sentence names fields only: a pydantic message would quote the input,
    and a command's input may hold a secret.
    """
    try:
        return model.model_validate_json(body)
    except ValidationError as exc:
        parts = [
            f"{'.'.join(str(loc) for loc in error['loc']) or 'body'}: {error['msg']}"
            for error in exc.errors(include_url=False, include_input=False)
        ]
        return f"The {model.__name__} command is invalid: " + "; ".join(parts[:5]) + "."


def command_subscriber(
    model: type[C],
    handle: Callable[[C], Awaitable[BaseModel]],
    invalid: Callable[[str], BaseModel],
) -> Callable[[NatsMessage], Awaitable[bytes]]:
    """A FastStream subscriber that validates by hand and encodes its reply.

    Validation happens here so no error quotes the input (it may hold a
    secret); the reply is the contract's JSON, whatever FastStream would do.
    """

    async def serve(message: NatsMessage) -> bytes:
        command = decode(model, message.body)
        if isinstance(command, str):
            log.warning("invalid command", command=model.__name__, problems=command)
            reply = invalid(command)
        else:
            reply = await handle(command)
        return reply.model_dump_json().encode()

    serve.__name__ = f"on_{model.__name__}"
    return serve
