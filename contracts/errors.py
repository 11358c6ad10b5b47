"""Error codes and the registry's own error, as carried in replies and events."""

from typing import Literal

from pydantic import BaseModel, ConfigDict

ErrorCode = Literal[
    "invalid_registry",
    "invalid_request",
    "credential_rejected",
    "registry_unreachable",
    "registry_address_forbidden",
    "registry_error",
    "credential_not_found",
    "invalid_image_reference",
    "credential_registry_mismatch",
    "image_not_found",
    "platform_not_supported",
    "app_not_found",
    "app_name_taken",
    "deploy_not_found",
    "credential_exists",
    "credential_in_use",
    "conflict",
    "service_unavailable",
    "internal_error",
]


class RegistryError(BaseModel):
    """Why a registry refused, in its own words plus ours.

    ``registry_*`` fields are what the registry sent; ``explanation`` is what the
    user should do about it.
    """

    model_config = ConfigDict(frozen=True)

    code: ErrorCode
    registry: str
    registry_status: int | None = None
    registry_code: str | None = None
    registry_message: str | None = None
    explanation: str
