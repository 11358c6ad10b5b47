"""Request bodies of the credentials API and their problem answers, no server."""

import asyncio
import json
from typing import Any

import pytest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from hypothesis import given
from hypothesis import strategies as st
from pydantic import BaseModel, ValidationError
from starlette.requests import Request

from services.gateway.problems import handle_validation
from services.gateway.schemas import CredentialIn, CredentialPatch

Body = dict[str, Any]

LIMITS = {"registry": 255, "username": 255, "name": 200}
SECRET_LIMIT = 65536
CONTROL = [chr(code) for code in range(32)] + ["\x7f"]
SPACES = [" ", "\t", "\n", "\u00a0", "\u2003", "\u3000"]
TEXT_FIELDS = [
    (CredentialIn, "registry"),
    (CredentialIn, "username"),
    (CredentialIn, "name"),
    (CredentialPatch, "username"),
    (CredentialPatch, "name"),
]
REQUEST = Request({"type": "http", "method": "POST", "path": "/", "headers": []})

printable = st.characters(categories=("L", "M", "N", "P", "S", "Zs"))


def clean(limit: int, exclude: str = "") -> st.SearchStrategy[str]:
    """Text a person types: printable, trimmed, within ``limit``."""
    alphabet = st.characters(
        categories=("L", "M", "N", "P", "S", "Zs"), exclude_characters=exclude
    )
    return st.text(alphabet, min_size=1, max_size=limit).map(str.strip).filter(bool)


def usable_secret() -> st.SearchStrategy[str]:
    # Multi-line JSON keys are secrets too: only NUL and blankness are refused.
    return st.text(min_size=1, max_size=300).filter(
        lambda value: value.strip() != "" and "\x00" not in value
    )


def valid(field: str) -> st.SearchStrategy[str]:
    if field == "secret":
        return usable_secret()
    return clean(LIMITS[field], exclude=":" if field == "username" else "")


credential_in = st.fixed_dictionaries(
    {name: valid(name) for name in ("registry", "username", "secret")},
    optional={"name": valid("name") | st.none()},
)
credential_patch = st.fixed_dictionaries(
    {},
    optional={name: valid(name) | st.none() for name in ("username", "secret", "name")},
)
BODIES: dict[type[BaseModel], st.SearchStrategy[Body]] = {
    CredentialIn: credential_in,
    CredentialPatch: credential_patch,
}


def spliced(value: str, inserted: str, at: int) -> str:
    at %= len(value) + 1
    return value[:at] + inserted + value[at:]


def refused(model: type[BaseModel], body: Body) -> ValidationError:
    with pytest.raises(ValidationError) as caught:
        model.model_validate(body)
    return caught.value


def fields_named(error: ValidationError) -> set[str]:
    return {".".join(str(part) for part in item["loc"]) for item in error.errors()}


# Valid bodies


@given(credential_in)
def test_a_valid_credential_is_taken_as_given(body: Body) -> None:
    credential = CredentialIn.model_validate(body)
    assert credential.registry == body["registry"]
    assert credential.username == body["username"]
    assert credential.secret.get_secret_value() == body["secret"]
    assert credential.name == body.get("name")
    assert json.loads(credential.model_dump_json())["secret"] == "**********"


@given(credential_patch)
def test_a_valid_change_is_taken_as_given(body: Body) -> None:
    change = CredentialPatch.model_validate(body)
    assert change.username == body.get("username")
    assert change.name == body.get("name")
    secret = None if change.secret is None else change.secret.get_secret_value()
    assert secret == body.get("secret")


# Text fields: registry, username, name


@pytest.mark.parametrize(("model", "field"), TEXT_FIELDS)
@given(data=st.data(), control=st.sampled_from(CONTROL), at=st.integers(0, 300))
def test_a_control_character_is_refused(
    model: type[BaseModel], field: str, data: st.DataObject, control: str, at: int
) -> None:
    body = data.draw(BODIES[model])
    body[field] = spliced(data.draw(valid(field)), control, at)
    assert fields_named(refused(model, body)) == {field}


@pytest.mark.parametrize(("model", "field"), TEXT_FIELDS)
@pytest.mark.parametrize("control", ["\x85", "\x9b"])
def test_a_c1_control_character_is_refused(
    model: type[BaseModel], field: str, control: str
) -> None:
    body: Body = {"username": "octocat", "secret": "ghp_x"}
    if model is CredentialIn:
        body["registry"] = "ghcr.io"
    body[field] = f"team{control}31mred"
    assert fields_named(refused(model, body)) == {field}


@pytest.mark.parametrize(("model", "field"), TEXT_FIELDS)
@given(data=st.data(), space=st.sampled_from(SPACES), leading=st.booleans())
def test_white_space_around_a_value_is_refused(
    model: type[BaseModel], field: str, data: st.DataObject, space: str, leading: bool
) -> None:
    body = data.draw(BODIES[model])
    value = data.draw(valid(field))
    body[field] = space + value if leading else value + space
    assert fields_named(refused(model, body)) == {field}


@pytest.mark.parametrize(("model", "field"), TEXT_FIELDS)
@given(data=st.data(), extra=st.integers(1, 100))
def test_an_over_long_value_is_refused(
    model: type[BaseModel], field: str, data: st.DataObject, extra: int
) -> None:
    body = data.draw(BODIES[model])
    body[field] = "a" * (LIMITS[field] + extra)
    error = refused(model, body)
    assert fields_named(error) == {field}
    assert str(LIMITS[field]) in error.errors()[0]["msg"]


@pytest.mark.parametrize("model", [CredentialIn, CredentialPatch])
@given(data=st.data(), at=st.integers(0, 300))
def test_a_colon_in_the_username_is_refused(
    model: type[BaseModel], data: st.DataObject, at: int
) -> None:
    body = data.draw(BODIES[model])
    body["username"] = spliced(data.draw(valid("username")), ":", at)
    error = refused(model, body)
    assert fields_named(error) == {"username"}
    assert "':'" in error.errors()[0]["msg"]


# The secret


@pytest.mark.parametrize("model", [CredentialIn, CredentialPatch])
@given(data=st.data(), blank=st.text(st.sampled_from(SPACES), max_size=20))
def test_a_blank_secret_is_refused(
    model: type[BaseModel], data: st.DataObject, blank: str
) -> None:
    body = data.draw(BODIES[model])
    body["secret"] = blank
    assert fields_named(refused(model, body)) == {"secret"}


@pytest.mark.parametrize("model", [CredentialIn, CredentialPatch])
@given(data=st.data(), at=st.integers(0, 300))
def test_a_nul_in_the_secret_is_refused(
    model: type[BaseModel], data: st.DataObject, at: int
) -> None:
    body = data.draw(BODIES[model])
    body["secret"] = spliced(data.draw(usable_secret()), "\x00", at)
    assert fields_named(refused(model, body)) == {"secret"}


@pytest.mark.parametrize("model", [CredentialIn, CredentialPatch])
@given(data=st.data(), extra=st.integers(1, 1000))
def test_an_over_long_secret_is_refused(
    model: type[BaseModel], data: st.DataObject, extra: int
) -> None:
    body = data.draw(BODIES[model])
    body["secret"] = "s" * (SECRET_LIMIT + extra)
    assert fields_named(refused(model, body)) == {"secret"}


# Shapes: types, missing and unknown fields

wrong_type = st.one_of(
    st.integers(),
    st.floats(allow_nan=False),
    st.booleans(),
    st.lists(st.text(max_size=5), max_size=3),
    st.dictionaries(st.text(max_size=5), st.text(max_size=5), max_size=3),
)


@pytest.mark.parametrize(
    ("model", "field"),
    [
        (CredentialIn, "registry"),
        (CredentialIn, "username"),
        (CredentialIn, "secret"),
        (CredentialIn, "name"),
        (CredentialPatch, "username"),
        (CredentialPatch, "secret"),
        (CredentialPatch, "name"),
    ],
)
@given(data=st.data(), value=wrong_type)
def test_a_value_of_the_wrong_type_is_refused(
    model: type[BaseModel], field: str, data: st.DataObject, value: object
) -> None:
    body = data.draw(BODIES[model])
    body[field] = value
    assert fields_named(refused(model, body)) == {field}


@pytest.mark.parametrize("field", ["registry", "username", "secret"])
@given(data=st.data())
def test_a_required_field_cannot_be_null(field: str, data: st.DataObject) -> None:
    body = data.draw(credential_in)
    body[field] = None
    assert fields_named(refused(CredentialIn, body)) == {field}


@given(
    body=credential_in,
    missing=st.sets(st.sampled_from(["registry", "username", "secret"]), min_size=1),
)
def test_each_missing_field_is_named(body: Body, missing: set[str]) -> None:
    for field in missing:
        del body[field]
    assert fields_named(refused(CredentialIn, body)) == missing


@pytest.mark.parametrize("model", [CredentialIn, CredentialPatch])
@given(data=st.data(), key=st.text(min_size=1, max_size=30), value=wrong_type)
def test_an_unknown_field_is_refused_by_name(
    model: type[BaseModel], data: st.DataObject, key: str, value: object
) -> None:
    body = data.draw(BODIES[model])
    if key in model.model_fields:
        key = f"x-{key}"
    body[key] = value
    error = refused(model, body)
    assert fields_named(error) == {key}
    assert error.errors()[0]["type"] == "extra_forbidden"


# The problem document for a refused body


def problem_for(model: type[BaseModel], body: Body) -> tuple[JSONResponse, Body]:
    """The gateway's answer to ``body``, with errors located as FastAPI does."""
    errors = [
        {**item, "loc": ("body", *item["loc"])}
        for item in refused(model, body).errors()
    ]
    return render(RequestValidationError(errors, body=body))


def render(exception: RequestValidationError) -> tuple[JSONResponse, Body]:
    with asyncio.Runner(loop_factory=asyncio.new_event_loop) as runner:
        response = runner.run(handle_validation(REQUEST, exception))
    assert isinstance(response, JSONResponse)
    problem: Body = json.loads(bytes(response.body))
    return response, problem


def strings_in(value: object) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [text for item in value.items() for text in strings_in(list(item))]
    if isinstance(value, list):
        return [text for item in value for text in strings_in(item)]
    return []


# A secret with a mark no field name or message could contain by chance.
marked_secret = st.text(
    st.characters(exclude_characters="\x00"), min_size=8, max_size=60
).map(lambda tail: "tok-" + tail)
breakages: dict[str, st.SearchStrategy[object]] = {
    "registry": st.sampled_from(["", " ghcr.io", "ghcr\x00.io", "r" * 256]),
    "username": st.sampled_from(["team:bot", "bot\n", "", 42]),
    "name": st.sampled_from(["\tname", "n" * 201, ["list"]]),
}


@given(
    data=st.data(),
    secret=marked_secret,
    broken=st.sets(st.sampled_from(sorted(breakages)), min_size=1),
    unknown=st.lists(st.from_regex(r"[a-z_]{1,12}", fullmatch=True), max_size=2),
)
def test_the_problem_names_each_bad_field_and_never_the_secret(
    data: st.DataObject, secret: str, broken: set[str], unknown: list[str]
) -> None:
    body: Body = data.draw(credential_in)
    body["secret"] = secret
    for field in broken:
        body[field] = data.draw(breakages[field])
    extra = {key for key in unknown if key not in CredentialIn.model_fields}
    for key in extra:
        body[key] = secret

    response, problem = problem_for(CredentialIn, body)
    assert response.status_code == 422
    assert response.media_type == "application/problem+json"
    assert problem["status"] == 422
    assert problem["code"] == "invalid_request"
    assert problem["detail"].startswith("The request is not valid.")
    assert problem["detail"].endswith(".")
    assert {item["field"] for item in problem["errors"]} == broken | extra
    for field in broken | extra:
        assert f"{field}: " in problem["detail"]
    assert not any(secret in text for text in strings_in(problem))


@given(
    secret=marked_secret,
    shape=st.sampled_from(["nul", "list", "dict", "long"]),
    model=st.sampled_from([CredentialIn, CredentialPatch]),
)
def test_a_refused_secret_is_named_but_not_quoted(
    secret: str, shape: str, model: type[BaseModel]
) -> None:
    values: dict[str, object] = {
        "nul": secret + "\x00" + secret,
        "list": [secret],
        "dict": {"value": secret},
        "long": secret * (SECRET_LIMIT // len(secret) + 1),
    }
    body: Body = {"username": "octocat", "name": "ci", "secret": values[shape]}
    if model is CredentialIn:
        body["registry"] = "ghcr.io"

    response, problem = problem_for(model, body)
    assert response.status_code == 422
    assert [item["field"] for item in problem["errors"]] == ["secret"]
    assert "secret: " in problem["detail"]
    assert not any(secret in text for text in strings_in(problem))


def test_a_body_that_is_not_json_is_named_as_the_body() -> None:
    # What FastAPI raises for '{"registry": "a", "secret": "tok-abc' (cut short).
    error = {
        "type": "json_invalid",
        "loc": ("body", 28),
        "msg": "JSON decode error",
        "input": {},
        "ctx": {"error": "Unterminated string starting at"},
    }
    response, problem = render(RequestValidationError([error]))
    assert response.status_code == 422
    assert [item["field"] for item in problem["errors"]] == ["body"]
    assert "body: " in problem["detail"]


@pytest.mark.parametrize("override", ["\u202e", "\u2066"])
def test_a_bidirectional_override_is_refused(override: str) -> None:
    body = {"registry": "ghcr.io", "username": f"octo{override}cat", "secret": "s"}
    assert fields_named(refused(CredentialIn, body)) == {"username"}
