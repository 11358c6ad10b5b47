"""Reading what registries send: challenges, error bodies, tokens, Retry-After."""

import json
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st

from services.registry.errors import MalformedResponseError
from services.registry.protocol import (
    Challenge,
    parse_challenges,
    parse_error_body,
    parse_retry_after,
    parse_token_response,
    select_challenge,
)

NOW = datetime(2025, 1, 1, 12, 0, tzinfo=UTC)


def test_bearer_challenge_from_the_spec() -> None:
    header = (
        'Bearer realm="https://auth.example/token",'
        'service="registry.example",scope="repository:team/app:pull"'
    )
    [challenge] = parse_challenges([header])
    assert challenge.scheme == "bearer"
    assert challenge.realm == "https://auth.example/token"
    assert challenge.service == "registry.example"
    assert challenge.scope == "repository:team/app:pull"


def test_basic_challenge_and_case_insensitive_names() -> None:
    [challenge] = parse_challenges(['BASIC Realm="Registry Realm"'])
    assert challenge == Challenge("basic", {"realm": "Registry Realm"})


def test_quoted_values_keep_commas_equals_and_escapes() -> None:
    header = r'Bearer realm="https://a/t?x=1,y=2", scope="a\"b\\c", error="x y"'
    [challenge] = parse_challenges([header])
    assert challenge.realm == "https://a/t?x=1,y=2"
    assert challenge.scope == 'a"b\\c'
    assert challenge.error == "x y"


def test_insufficient_scope_challenge() -> None:
    header = (
        'Bearer realm="http://127.0.0.1:1/token",service="svc",'
        'scope="repository:team/app:pull",error="insufficient_scope"'
    )
    [challenge] = parse_challenges([header])
    assert challenge.error == "insufficient_scope"


def test_several_challenges_in_one_header_and_across_headers() -> None:
    challenges = parse_challenges(
        ['Negotiate abc123==, Basic realm="b"', 'Bearer realm="t",service="s"']
    )
    assert [c.scheme for c in challenges] == ["negotiate", "basic", "bearer"]
    assert select_challenge(challenges) == Challenge(
        "bearer", {"realm": "t", "service": "s"}
    )


def test_basic_is_chosen_when_bearer_is_not_offered() -> None:
    challenges = parse_challenges(['Negotiate, Basic realm="r"'])
    assert select_challenge(challenges) == Challenge("basic", {"realm": "r"})
    assert select_challenge(parse_challenges(["Negotiate"])) is None


def test_unquoted_values_are_read_leniently() -> None:
    [challenge] = parse_challenges(["Bearer realm=https://auth/token,service=reg"])
    assert challenge.params == {"realm": "https://auth/token", "service": "reg"}


@pytest.mark.parametrize(
    "header",
    ['Bearer realm="never closed', '=realm"x"', 'Bearer realm="a" service="b"'],
)
def test_malformed_challenges_are_refused(header: str) -> None:
    with pytest.raises(MalformedResponseError, match="WWW-Authenticate"):
        parse_challenges([header])


TOKEN = st.from_regex(r"[A-Za-z][A-Za-z0-9_-]{0,10}", fullmatch=True)
VALUE = st.text(
    st.characters(blacklist_categories=("Cc", "Cs"), max_codepoint=0x2FFF),
    max_size=30,
)


def _quote(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


@given(
    st.lists(
        st.tuples(TOKEN, st.dictionaries(TOKEN.map(str.lower), VALUE, max_size=4)),
        min_size=1,
        max_size=3,
    ),
    st.sampled_from([",", ", ", " , "]),
)
def test_formatted_challenges_parse_back(
    challenges: list[tuple[str, dict[str, str]]], separator: str
) -> None:
    header = ", ".join(
        scheme
        + (" " if params else "")
        + separator.join(f"{name}={_quote(value)}" for name, value in params.items())
        for scheme, params in challenges
    )
    parsed = parse_challenges([header])
    assert [(c.scheme, dict(c.params)) for c in parsed] == [
        (scheme.lower(), params) for scheme, params in challenges
    ]


@given(st.text(max_size=60))
def test_any_header_parses_or_is_refused_as_malformed(header: str) -> None:
    try:
        parse_challenges([header])
    except MalformedResponseError as exc:
        assert "WWW-Authenticate" in exc.detail


def test_distribution_json_error() -> None:
    body = json.dumps(
        {
            "errors": [
                {
                    "code": "UNAUTHORIZED",
                    "message": "authentication required",
                    "detail": [{"Type": "repository", "Name": "team/app"}],
                }
            ]
        }
    ).encode()
    failure = parse_error_body(401, "application/json; charset=utf-8", body)
    assert (failure.status, failure.code, failure.message) == (
        401,
        "UNAUTHORIZED",
        "authentication required",
    )


def test_several_json_errors_keep_every_message() -> None:
    body = b'{"errors":[{"code":"DENIED","message":"a"},{"code":"X","message":"b"}]}'
    failure = parse_error_body(403, "application/json", body)
    assert (failure.code, failure.message) == ("DENIED", "a; b")


def test_oauth_style_token_error() -> None:
    body = b'{"details":"incorrect username or password"}'
    failure = parse_error_body(401, "application/json", body)
    assert failure.message == "incorrect username or password"


def test_ecr_expired_token_is_plain_text() -> None:
    body = b"Your authorization token has expired. Reauthenticate and try again.\n"
    failure = parse_error_body(403, "text/plain; charset=utf-8", body)
    assert failure.code is None
    assert failure.message == (
        "Your authorization token has expired. Reauthenticate and try again."
    )


def test_html_page_is_summarised_by_its_title() -> None:
    body = (
        b"<!DOCTYPE html><html><head><title>502 Bad &amp; Gateway</title></head>"
        b"<body><h1>nginx</h1><script>x()</script></body></html>"
    )
    failure = parse_error_body(502, "text/html", body)
    assert failure.is_html
    assert failure.message == "502 Bad & Gateway"


def test_html_without_title_or_content_type() -> None:
    failure = parse_error_body(403, "", b"<html><body>nope</body></html>")
    assert failure.is_html
    assert failure.message == "an HTML page"


@pytest.mark.parametrize("body", [b"", b"   \n"])
def test_empty_body(body: bytes) -> None:
    assert parse_error_body(404, "text/plain", body).message is None


@pytest.mark.parametrize(
    "body",
    [b"{not json", b"[1, 2]", b'{"errors": "nope"}', b'{"errors": [1, 2]}', b"null"],
)
def test_json_that_is_not_an_error_document_is_kept_as_text(body: bytes) -> None:
    failure = parse_error_body(500, "application/json", body)
    assert failure.code is None
    assert failure.message == body.decode()


def test_deeply_nested_json_does_not_crash() -> None:
    failure = parse_error_body(500, "application/json", b"[" * 100_000)
    assert failure.message is not None
    assert len(failure.message) <= 300


@given(st.binary(max_size=300), st.sampled_from(["", "text/html", "application/json"]))
def test_any_body_gives_one_short_line(body: bytes, content_type: str) -> None:
    failure = parse_error_body(400, content_type, body)
    if failure.message is not None:
        assert len(failure.message) <= 300
        assert failure.message.isprintable()


def test_retry_after_seconds_and_dates() -> None:
    assert parse_retry_after("3", now=NOW) == 3.0
    assert parse_retry_after(" 0 ", now=NOW) == 0.0
    assert parse_retry_after("Wed, 01 Jan 2025 12:00:30 GMT", now=NOW) == 30.0
    assert parse_retry_after("Wed, 01 Jan 2025 11:00:00 GMT", now=NOW) == 0.0
    assert parse_retry_after("soon", now=NOW) is None
    assert parse_retry_after("-1", now=NOW) is None
    assert parse_retry_after(None, now=NOW) is None


def test_token_response_with_token_or_access_token() -> None:
    grant = parse_token_response(b'{"token":"t1","expires_in":300}', now=NOW)
    assert (grant.token, grant.lifetime_s) == ("t1", 300.0)
    grant = parse_token_response(b'{"access_token":"t2"}', now=NOW)
    assert (grant.token, grant.lifetime_s) == ("t2", 60.0)
    assert "t2" not in repr(grant)


def test_token_lifetime_counts_from_issued_at() -> None:
    issued = (NOW - timedelta(seconds=100)).isoformat().replace("+00:00", "Z")
    body = json.dumps({"token": "t", "expires_in": 300, "issued_at": issued})
    assert parse_token_response(body.encode(), now=NOW).lifetime_s == 200.0


def test_token_lifetime_is_at_least_the_default() -> None:
    grant = parse_token_response(b'{"token":"t","expires_in":5}', now=NOW)
    assert grant.lifetime_s == 60.0


@pytest.mark.parametrize(
    "body",
    [
        b"<html></html>",
        b"[]",
        b'{"token": ""}',
        b'{"expires_in": 60}',
        '{"token": "caf\u00e9 au lait"}'.encode(),
        b'{"token": "a\\r\\nX-Injected: 1"}',
    ],
)
def test_token_response_without_a_token_is_malformed(body: bytes) -> None:
    with pytest.raises(MalformedResponseError, match="token service"):
        parse_token_response(body, now=NOW)
