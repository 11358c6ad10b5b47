"""The verifier against a real CNCF distribution registry on loopback."""

import asyncio
import socket
import time
from collections.abc import Iterator

import pytest

from contracts.commands import VerifyCredential
from contracts.replies import Verification
from services.backbone.embedded import free_port
from services.backbone.settings import Settings
from services.registry.client import TokenCache
from services.verifier.handlers import verify_credential
from tests.support.registry import LocalRegistry, push_image

REPO = "verifier/app"
TAG = "v1"


def settings_for(registry: LocalRegistry, **changes: object) -> Settings:
    values: dict[str, object] = {
        "insecure_registries": [registry.host],
        "allow_registries": ["127.0.0.1"],
        "registry_timeout_s": 5.0,
    }
    values.update(changes)
    return Settings.model_validate(values)


async def verify(
    registry: LocalRegistry | str,
    username: str,
    secret: str,
    *,
    image: str | None = None,
    settings: Settings | None = None,
    tokens: TokenCache | None = None,
) -> Verification:
    host = registry if isinstance(registry, str) else registry.host
    if settings is None:
        assert isinstance(registry, LocalRegistry)
        settings = settings_for(registry)
    cmd = VerifyCredential(registry=host, username=username, secret=secret, image=image)
    return await verify_credential(cmd, settings, tokens=tokens)


@pytest.fixture(scope="module")
def basic(registry_basic: LocalRegistry) -> LocalRegistry:
    push_image(registry_basic, REPO, TAG)
    return registry_basic


@pytest.fixture(scope="module")
def token(registry_token: LocalRegistry) -> LocalRegistry:
    push_image(registry_token, REPO, TAG)
    return registry_token


def issued(registry: LocalRegistry, user: str) -> list[str]:
    """The scopes ``user`` asked the token issuer for, in order."""
    assert registry.issuer is not None
    return [scope for name, scope in registry.issuer.requests if name == user]


async def test_basic_login_is_accepted(basic: LocalRegistry) -> None:
    verification = await verify(basic, "alice", "alice-pass")
    assert verification == Verification(outcome="accepted", registry=basic.host)


async def test_basic_wrong_password_is_rejected_in_the_registrys_words(
    basic: LocalRegistry,
) -> None:
    verification = await verify(basic, "alice", "wrong-pass")
    assert verification.outcome == "rejected"
    error = verification.error
    assert error is not None
    assert error.code == "credential_rejected"
    assert error.registry == basic.host
    assert error.registry_status == 401
    assert error.registry_code == "UNAUTHORIZED"
    assert error.registry_message == "authentication required"
    assert "wrong username or token" in error.explanation
    assert "wrong-pass" not in verification.model_dump_json()


async def test_basic_with_a_readable_image_is_accepted(basic: LocalRegistry) -> None:
    verification = await verify(basic, "alice", "alice-pass", image=f"{REPO}:{TAG}")
    assert verification.outcome == "accepted"


async def test_a_missing_image_leaves_the_login_accepted(basic: LocalRegistry) -> None:
    image = f"{basic.host}/verifier/never-pushed:v9"
    verification = await verify(basic, "alice", "alice-pass", image=image)
    assert verification.outcome == "accepted"


async def test_bearer_login_is_accepted_with_a_token_without_scope(
    token: LocalRegistry,
) -> None:
    before = len(issued(token, "alice"))
    verification = await verify(token, "alice", "alice-pass")
    assert verification.outcome == "accepted"
    assert issued(token, "alice")[before:] == [""]


async def test_bearer_wrong_password_fails_at_the_token_endpoint(
    token: LocalRegistry,
) -> None:
    before = len(issued(token, "alice"))
    verification = await verify(token, "alice", "wrong-pass")
    error = verification.error
    assert error is not None
    assert (error.code, error.registry_status) == ("credential_rejected", 401)
    assert error.registry_message == "authentication required"
    assert issued(token, "alice")[before:] == [""]


async def test_bearer_with_a_readable_image_is_accepted(token: LocalRegistry) -> None:
    before = len(issued(token, "alice"))
    verification = await verify(token, "alice", "alice-pass", image=f"{REPO}:{TAG}")
    assert verification.outcome == "accepted"
    assert issued(token, "alice")[before:] == ["", f"repository:{REPO}:pull"]


async def test_a_user_without_access_gets_a_token_but_cannot_read(
    token: LocalRegistry,
) -> None:
    # The login alone passes: the token server grants an empty token.
    assert (await verify(token, "nobody", "nobody-pass")).outcome == "accepted"

    verification = await verify(token, "nobody", "nobody-pass", image=f"{REPO}:{TAG}")
    error = verification.error
    assert error is not None
    assert error.code == "credential_rejected"
    assert error.registry_status == 401
    assert error.registry_code == "UNAUTHORIZED"
    assert error.registry_message == "authentication required (insufficient_scope)"
    assert error.explanation.startswith(
        f"The registry accepted the login but refused to let it read {REPO}"
    )


async def test_verification_asks_the_token_service_every_time(
    token: LocalRegistry,
) -> None:
    # A cached token would vouch for a secret the registry revoked since.
    tokens = TokenCache()
    before = len(issued(token, "alice"))
    image = f"{REPO}:{TAG}"
    for _ in range(2):
        verification = await verify(
            token, "alice", "alice-pass", image=image, tokens=tokens
        )
        assert verification.outcome == "accepted"
    scope = f"repository:{REPO}:pull"
    assert issued(token, "alice")[before:] == ["", scope, "", scope]
    wrong = await verify(token, "alice", "wrong-pass", tokens=tokens)
    assert wrong.outcome == "rejected"


async def test_a_closed_port_is_unreachable_and_named(basic: LocalRegistry) -> None:
    host = f"127.0.0.1:{free_port()}"
    settings = Settings(
        insecure_registries=[host],
        allow_registries=["127.0.0.1"],
        registry_timeout_s=3.0,
    )
    started = time.monotonic()
    verification = await verify(host, "alice", "alice-pass", settings=settings)
    assert time.monotonic() - started < 3.0
    error = verification.error
    assert error is not None
    assert error.code == "registry_unreachable"
    assert error.explanation == f"Could not connect to {host} (connection refused)."


@pytest.fixture
def silent_server() -> Iterator[str]:
    """A port that accepts connections and never answers."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(8)
        yield f"127.0.0.1:{server.getsockname()[1]}"


async def test_a_silent_server_ends_within_the_time_budget(silent_server: str) -> None:
    settings = Settings(
        insecure_registries=[silent_server],
        allow_registries=["127.0.0.1"],
        registry_timeout_s=1.0,
    )
    started = time.monotonic()
    verification = await verify(silent_server, "alice", "pw", settings=settings)
    assert time.monotonic() - started < 2.0
    error = verification.error
    assert error is not None
    assert error.code == "registry_unreachable"
    assert error.explanation == f"{silent_server} did not answer within 1 s."


async def test_loopback_is_refused_without_the_allow_list(
    token: LocalRegistry,
) -> None:
    before = len(issued(token, "alice"))
    settings = settings_for(token, allow_registries=[])
    verification = await verify(token, "alice", "alice-pass", settings=settings)
    error = verification.error
    assert error is not None
    assert error.code == "registry_address_forbidden"
    assert error.explanation.startswith("The host 127.0.0.1 is a loopback address")
    assert len(issued(token, "alice")) == before


async def test_a_name_for_loopback_is_refused_too(basic: LocalRegistry) -> None:
    host = f"localhost:{basic.port}"
    settings = Settings(insecure_registries=[host])
    verification = await verify(host, "alice", "alice-pass", settings=settings)
    error = verification.error
    assert error is not None
    assert error.code == "registry_address_forbidden"
    assert "The host localhost resolves to" in error.explanation


async def test_the_allow_list_opens_a_host_by_name(basic: LocalRegistry) -> None:
    host = f"localhost:{basic.port}"
    settings = Settings(insecure_registries=[host], allow_registries=["localhost"])
    verification = await verify(host, "alice", "alice-pass", settings=settings)
    assert verification.outcome == "accepted"


async def test_a_plain_http_registry_not_listed_as_insecure(
    basic: LocalRegistry,
) -> None:
    settings = settings_for(basic, insecure_registries=[])
    verification = await verify(basic, "alice", "alice-pass", settings=settings)
    error = verification.error
    assert error is not None
    assert error.code == "registry_unreachable"
    assert f"The TLS handshake with {basic.host} failed" in error.explanation
    assert "insecure_registries" in error.explanation


async def test_concurrent_verifications_share_one_cache(token: LocalRegistry) -> None:
    tokens = TokenCache()
    results = await asyncio.gather(
        *(verify(token, "alice", "alice-pass", tokens=tokens) for _ in range(5))
    )
    assert {result.outcome for result in results} == {"accepted"}
    assert len(tokens) == 1
