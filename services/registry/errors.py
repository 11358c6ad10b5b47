"""Errors met while reaching or reading a registry: one root, grouped by who acts.

Messages name hosts, statuses and the registry's own words, never a secret.
"""

from contracts.errors import ErrorCode


class RegistryAccessError(Exception):
    """Root of every error raised while talking to a registry."""

    code: ErrorCode = "registry_error"

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


# Input family: what the user typed cannot be used as given.


class InvalidInputError(RegistryAccessError):
    """The request names something that cannot be used as given."""


class InvalidRegistryError(InvalidInputError):
    """The registry host is not a host we can talk to."""

    code: ErrorCode = "invalid_registry"


class InvalidImageError(InvalidInputError):
    """The image named for the check is not a repository on this registry."""

    code: ErrorCode = "invalid_request"


class InvalidAllowEntryError(RegistryAccessError):
    """An ``allow_registries`` entry is neither a host, host:port, IP nor CIDR."""


# Policy family: we refuse to talk to the place the registry points at.


class RegistryPolicyError(RegistryAccessError):
    """Talking to this address or in this way is not allowed."""


class RegistryAddressForbiddenError(RegistryPolicyError):
    """A host resolves only to addresses the request-forgery guard refuses."""

    code: ErrorCode = "registry_address_forbidden"


class InsecureTransportError(RegistryPolicyError):
    """Credentials would travel over plain http to a host not listed as insecure."""

    code: ErrorCode = "registry_error"


# Infrastructure family: the registry could not be reached or is not one.


class RegistryUnreachableError(RegistryAccessError):
    """No usable answer: DNS, connect, TLS, timeout, or not a registry at all."""

    code: ErrorCode = "registry_unreachable"


# Answer family: the registry answered, and said no.


class RegistryResponseError(RegistryAccessError):
    """The registry or its token service answered with an error."""

    code: ErrorCode = "registry_error"

    def __init__(
        self,
        detail: str,
        *,
        status: int | None,
        registry_code: str | None = None,
        registry_message: str | None = None,
        challenge_error: str | None = None,
        retry_after_s: float | None = None,
    ) -> None:
        super().__init__(detail)
        self.status = status
        self.registry_code = registry_code
        self.registry_message = registry_message
        self.challenge_error = challenge_error
        self.retry_after_s = retry_after_s


class MalformedResponseError(RegistryResponseError):
    """The registry answered something the protocol does not allow."""
