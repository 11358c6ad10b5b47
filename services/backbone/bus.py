"""Request/reply between services with typed commands and replies."""

from typing import TypeVar

from nats.aio.client import Client as NATS
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeoutError
from pydantic import BaseModel

from services.backbone.errors import ServiceUnavailableError

R = TypeVar("R", bound=BaseModel)


async def request(
    nc: NATS, subject: str, command: BaseModel, reply_type: type[R], timeout: float
) -> R:
    """Send a command and parse its reply; no answer in time is an error."""
    payload = command.model_dump_json().encode()
    try:
        message = await nc.request(
            subject,
            payload,
            timeout=timeout,
            headers={"content-type": "application/json"},
        )
    except NoRespondersError as exc:
        raise ServiceUnavailableError(f"no service is serving {subject}") from exc
    except NatsTimeoutError as exc:
        raise ServiceUnavailableError(
            f"{subject} did not answer within {timeout:g} s"
        ) from exc
    return reply_type.model_validate_json(message.data)
