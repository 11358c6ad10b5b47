"""RFC 9457 problem responses with the API's error codes."""

from typing import Any

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from contracts.errors import ErrorCode
from contracts.replies import Failure

PROBLEM_JSON = "application/problem+json"

STATUS_BY_CODE: dict[str, int] = {
    "invalid_request": 422,
    "invalid_registry": 422,
    "credential_rejected": 422,
    "registry_unreachable": 422,
    "registry_address_forbidden": 422,
    "registry_error": 422,
    "invalid_image_reference": 422,
    "image_not_found": 422,
    "platform_not_supported": 422,
    "credential_registry_mismatch": 422,
    "app_not_found": 404,
    "deploy_not_found": 404,
    "app_name_taken": 409,
    "unauthorized": 401,
    "credential_not_found": 404,
    "not_found": 404,
    "credential_exists": 409,
    "credential_in_use": 409,
    "conflict": 409,
    "service_unavailable": 503,
    "internal_error": 500,
}


class ProblemError(Exception):
    """Raised by routes to answer with a problem document."""

    def __init__(self, code: str, detail: str, **extra: Any) -> None:
        super().__init__(detail)
        self.code = code
        self.detail = detail
        self.status = STATUS_BY_CODE.get(code, 500)
        self.extra = extra


def from_failure(failure: Failure) -> ProblemError:
    extra: dict[str, Any] = dict(failure.extra or {})
    if failure.registry_error is not None:
        error = failure.registry_error
        extra.update(
            registry=error.registry,
            registry_status=error.registry_status,
            registry_code=error.registry_code,
            registry_message=error.registry_message,
        )
    if failure.apps is not None:
        extra["apps"] = [app.model_dump() for app in failure.apps]
    return ProblemError(failure.code, failure.detail, **extra)


def not_found(code: ErrorCode, what: str) -> ProblemError:
    return ProblemError(code, f"{what} does not exist in this account.")


def problem_response(problem: ProblemError) -> JSONResponse:
    title = problem.code.replace("_", " ").capitalize()
    body = {
        "type": f"https://crabglamp.dev/problems/{problem.code.replace('_', '-')}",
        "title": title,
        "status": problem.status,
        "detail": problem.detail,
        "code": problem.code,
        **problem.extra,
    }
    headers = {"WWW-Authenticate": "Bearer"} if problem.status == 401 else None
    return JSONResponse(
        body, status_code=problem.status, media_type=PROBLEM_JSON, headers=headers
    )


async def handle_problem(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ProblemError)
    return problem_response(exc)


async def handle_validation(_request: Request, exc: Exception) -> JSONResponse:
    """Name each bad field in a sentence; never echo the submitted values."""
    assert isinstance(exc, RequestValidationError)
    errors = []
    sentences = []
    for error in exc.errors():
        location = [str(part) for part in error["loc"] if part != "body"]
        # A body that is not JSON has a character offset where a field would be.
        field = "body" if error["type"] == "json_invalid" else ".".join(location)
        field = field or "body"
        message = str(error["msg"]).removeprefix("Value error, ")
        errors.append({"field": field, "message": message})
        sentences.append(f"{field}: {message}")
    detail = "The request is not valid. " + "; ".join(sentences) + "."
    return problem_response(ProblemError("invalid_request", detail, errors=errors))
