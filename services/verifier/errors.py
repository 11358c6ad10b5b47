"""The verifier's own refusals; everything else it raises is a registry error."""

from contracts.errors import ErrorCode
from services.registry.errors import InvalidInputError


class SecretFormatError(InvalidInputError):
    """The secret cannot be what this registry expects, judged before any call."""

    code: ErrorCode = "credential_rejected"
