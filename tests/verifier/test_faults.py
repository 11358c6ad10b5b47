"""Faults a real registry on loopback will not produce, played by a small fake.

The fake answers through ``httpx.MockTransport``; the address guard still runs
on every URL, with a resolver that puts ``*.inside.test`` on loopback and every
other name on a public address.
"""

import asyncio
import base64
import ipaddress
import time
from collections.abc import Awaitable, Callable

import httpx
import pytest
from pydantic import SecretStr

from contracts.commands import VerifyCredential
from contracts.replies import Verification
from services.backbone.settings import Settings
from services.registry.client import TokenCache
from services.registry.guard import AddressGuard, IPAddress
from services.registry.protocol import MANIFEST_MEDIA_TYPES
from services.verifier.handlers import verify_credential

SECRET = "s3cr3t-Token-value"
API = {"Docker-Distribution-API-Version": "registry/2.0"}
BASIC = {**API, "WWW-Authenticate": 'Basic realm="fake"'}
UNAUTHORIZED = {
    "errors": [{"code": "UNAUTHORIZED", "message": "authentication required"}]
}
DIGEST = "sha256:" + "a" * 64

Handler = Callable[[httpx.Request], httpx.Response]
AnyHandler = Callable[[httpx.Request], httpx.Response | Awaitable[httpx.Response]]


async def resolver(host: str, port: int) -> list[IPAddress]:
    if host.endswith("inside.test"):
        return [ipaddress.ip_address("127.0.0.1")]
    return [ipaddress.ip_address("93.184.216.34")]


def basic_ok(request: httpx.Request) -> bool:
    pair = base64.b64encode(f"alice:{SECRET}".encode()).decode()
    return bool(request.headers.get("authorization") == f"Basic {pair}")


class Fake:
    """Records every request the verifier sends and answers with ``handler``."""

    def __init__(self, handler: AnyHandler) -> None:
        self.handler = handler
        self.requests: list[httpx.Request] = []

    async def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        answer = self.handler(request)
        return answer if isinstance(answer, httpx.Response) else await answer

    def hosts(self) -> list[str]:
        return [request.url.host for request in self.requests]

    async def verify(
        self,
        *,
        registry: str = "registry.test",
        username: str = "alice",
        secret: str = SECRET,
        image: str | None = None,
        settings: Settings | None = None,
        tokens: TokenCache | None = None,
    ) -> Verification:
        cmd = VerifyCredential(
            registry=registry, username=username, secret=secret, image=image
        )
        return await verify_credential(
            cmd,
            settings or Settings(registry_timeout_s=5),
            tokens=tokens,
            guard=AddressGuard(resolver=resolver),
            transport=httpx.MockTransport(self),
        )


def basic_registry(manifest: Handler | None = None) -> Handler:
    """/v2/ behind Basic auth; manifests answered by ``manifest``."""

    def handle(request: httpx.Request) -> httpx.Response:
        if not basic_ok(request):
            return httpx.Response(401, headers=BASIC, json=UNAUTHORIZED)
        if request.url.path == "/v2/":
            return httpx.Response(200, headers=API, json={})
        assert manifest is not None
        return manifest(request)

    return handle


async def test_429_with_retry_after_is_retried_once() -> None:
    answers = iter([httpx.Response(429, headers={"Retry-After": "1"})])

    def handle(request: httpx.Request) -> httpx.Response:
        return next(answers, None) or basic_registry()(request)

    fake = Fake(handle)
    started = time.monotonic()
    verification = await fake.verify()
    assert verification.outcome == "accepted"
    assert time.monotonic() - started >= 1.0
    assert len(fake.requests) == 3


async def test_429_twice_is_reported_with_the_wait() -> None:
    fake = Fake(lambda _: httpx.Response(429, headers={"Retry-After": "1"}))
    verification = await fake.verify()
    assert verification.outcome == "rejected"
    assert verification.error is not None
    assert verification.error.code == "registry_error"
    assert verification.error.registry_status == 429
    assert "try again in 1 s" in verification.error.explanation
    assert len(fake.requests) == 2


async def test_429_with_a_long_wait_is_not_waited_for() -> None:
    body = {"errors": [{"code": "TOOMANYREQUESTS", "message": "slow down"}]}
    fake = Fake(
        lambda _: httpx.Response(429, headers={"Retry-After": "3600"}, json=body)
    )
    started = time.monotonic()
    verification = await fake.verify()
    assert time.monotonic() - started < 1.0
    assert verification.error is not None
    assert verification.error.registry_code == "TOOMANYREQUESTS"
    assert verification.error.registry_message == "slow down"
    assert "try again in 3600 s" in verification.error.explanation
    assert len(fake.requests) == 1


async def test_ecr_expired_token_plain_text_403() -> None:
    expired = "Your authorization token has expired. Reauthenticate and try again."

    def handle(request: httpx.Request) -> httpx.Response:
        if "authorization" not in request.headers:
            return httpx.Response(401, headers=BASIC)
        return httpx.Response(403, headers={"Content-Type": "text/plain"}, text=expired)

    verification = await Fake(handle).verify(
        registry="123456789012.dkr.ecr.eu-west-1.amazonaws.com", username="AWS"
    )
    error = verification.error
    assert error is not None
    assert (error.code, error.registry_status) == ("credential_rejected", 403)
    assert error.registry_code is None
    assert error.registry_message == expired
    assert error.explanation.startswith(
        "The ECR token has expired (they last 12 hours)"
    )


async def test_a_web_page_at_v2_is_not_a_registry() -> None:
    page = "<!doctype html><html><title>Welcome</title><body>Hi</body></html>"
    fake = Fake(
        lambda _: httpx.Response(200, headers={"Content-Type": "text/html"}, text=page)
    )
    verification = await fake.verify(registry="www.example.com")
    assert verification.error is not None
    assert verification.error.code == "registry_unreachable"
    assert verification.error.explanation.startswith(
        "www.example.com is not a container registry"
    )


async def test_a_404_site_is_not_a_registry() -> None:
    fake = Fake(lambda _: httpx.Response(404, text="404 page not found"))
    verification = await fake.verify()
    assert verification.error is not None
    assert verification.error.code == "registry_unreachable"
    assert "is not a container registry" in verification.error.explanation


async def test_401_without_a_challenge_is_not_a_registry() -> None:
    fake = Fake(lambda _: httpx.Response(401, text="who are you"))
    verification = await fake.verify()
    assert verification.error is not None
    assert verification.error.code == "registry_unreachable"


async def test_a_failing_registry_is_a_registry_error() -> None:
    body = {"errors": [{"code": "UNAVAILABLE", "message": "maintenance"}]}
    fake = Fake(lambda _: httpx.Response(503, headers=API, json=body))
    verification = await fake.verify()
    error = verification.error
    assert error is not None
    assert (error.code, error.registry_status) == ("registry_error", 503)
    assert error.registry_message == "maintenance"
    assert error.explanation.endswith("The registry is failing; try again later.")


async def test_an_unreadable_challenge_is_a_registry_error() -> None:
    headers = {**API, "WWW-Authenticate": 'Bearer realm="https://auth.test/tok'}
    fake = Fake(lambda _: httpx.Response(401, headers=headers))
    verification = await fake.verify()
    assert verification.error is not None
    assert verification.error.code == "registry_error"
    assert "WWW-Authenticate" in verification.error.explanation


@pytest.mark.parametrize(
    "location", ["https://registry.inside.test/v2/", "http://127.0.0.1:5000/v2/"]
)
async def test_a_redirect_to_loopback_is_refused(location: str) -> None:
    def handle(request: httpx.Request) -> httpx.Response:
        return httpx.Response(302, headers={"Location": location})

    fake = Fake(handle)
    settings = Settings(insecure_registries=["127.0.0.1:5000"])
    verification = await fake.verify(settings=settings)
    assert verification.error is not None
    assert verification.error.code == "registry_address_forbidden"
    assert "loopback" in verification.error.explanation
    assert fake.hosts() == ["registry.test"]


async def test_redirects_keep_authorization_only_on_the_same_origin() -> None:
    def manifest(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/v1"):
            return httpx.Response(307, headers={"Location": "/v2/team/app/moved"})
        return httpx.Response(307, headers={"Location": "https://storage.test/m"})

    def handle(request: httpx.Request) -> httpx.Response:
        if request.url.host == "storage.test":
            headers = {"Docker-Content-Digest": DIGEST}
            return httpx.Response(200, headers=headers)
        return basic_registry(manifest)(request)

    fake = Fake(handle)
    verification = await fake.verify(image="team/app:v1")
    assert verification.outcome == "accepted"
    moves = [r for r in fake.requests if r.method == "HEAD"]
    assert [r.url.path for r in moves] == [
        "/v2/team/app/manifests/v1",
        "/v2/team/app/moved",
        "/m",
    ]
    assert ["authorization" in r.headers for r in moves] == [True, True, False]


async def test_redirects_stop_after_five() -> None:
    def handle(request: httpx.Request) -> httpx.Response:
        step = int(request.url.params.get("n", "0"))
        return httpx.Response(302, headers={"Location": f"/v2/?n={step + 1}"})

    fake = Fake(handle)
    verification = await fake.verify()
    assert verification.error is not None
    assert verification.error.code == "registry_error"
    assert "redirected more than 5 times" in verification.error.explanation
    assert len(fake.requests) == 6


def bearer_registry(realm: str, token_answer: Handler) -> Handler:
    challenge = {**API, "WWW-Authenticate": f'Bearer realm="{realm}",service="fake"'}

    def handle(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/token":
            return token_answer(request)
        if request.headers.get("authorization") == "Bearer good-token":
            return httpx.Response(200, headers=API, json={})
        return httpx.Response(401, headers=challenge, json=UNAUTHORIZED)

    return handle


def grant(request: httpx.Request) -> httpx.Response:
    if not basic_ok(request):
        return httpx.Response(401, json={"details": "incorrect username or password"})
    return httpx.Response(200, json={"token": "good-token", "expires_in": 300})


async def test_credentials_never_go_to_a_plain_http_realm() -> None:
    fake = Fake(bearer_registry("http://auth.test/token", grant))
    verification = await fake.verify()
    assert verification.error is not None
    assert verification.error.code == "registry_error"
    assert "plain http" in verification.error.explanation
    assert "insecure_registries" in verification.error.explanation
    assert "auth.test" not in fake.hosts()


async def test_a_realm_on_loopback_is_refused() -> None:
    fake = Fake(bearer_registry("https://auth.inside.test/token", grant))
    verification = await fake.verify()
    assert verification.error is not None
    assert verification.error.code == "registry_address_forbidden"
    assert "auth.inside.test" not in fake.hosts()


async def test_the_token_service_refusal_is_a_rejected_credential() -> None:
    fake = Fake(bearer_registry("https://auth.test/token", grant))
    verification = await fake.verify(secret="wrong-secret")
    error = verification.error
    assert error is not None
    assert (error.code, error.registry_status) == ("credential_rejected", 401)
    assert error.registry_message == "incorrect username or password"
    token_request = fake.requests[-1]
    assert token_request.url.params.get("service") == "fake"
    assert "scope" not in token_request.url.params


async def test_access_token_is_accepted_in_place_of_token() -> None:
    def answer(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, json={"access_token": "good-token"})

    fake = Fake(bearer_registry("https://auth.test/token", answer))
    assert (await fake.verify()).outcome == "accepted"


async def test_a_token_service_answering_html_is_a_registry_error() -> None:
    def answer(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, text="<html>login</html>")

    fake = Fake(bearer_registry("https://auth.test/token", answer))
    verification = await fake.verify()
    assert verification.error is not None
    assert verification.error.code == "registry_error"
    assert "without a JSON object" in verification.error.explanation


async def test_cached_tokens_are_reused_until_they_expire() -> None:
    now = [1000.0]
    tokens = TokenCache(clock=lambda: now[0])
    key = tokens.key("registry.test", "alice", SecretStr("s3cret"), "scope")
    tokens.put(key, "tok", 300)
    assert tokens.get(key) == "tok"
    now[0] += 289.0
    assert tokens.get(key) == "tok"
    now[0] += 2.0
    assert tokens.get(key) is None


async def test_verification_never_proves_a_secret_with_a_cached_token() -> None:
    tokens = TokenCache()
    fake = Fake(bearer_registry("https://auth.test/token", grant))
    assert (await fake.verify(tokens=tokens)).outcome == "accepted"
    assert (await fake.verify(tokens=tokens)).outcome == "accepted"
    assert sum(1 for r in fake.requests if r.url.path == "/token") == 2


async def test_a_cached_token_does_not_vouch_for_another_secret() -> None:
    tokens = TokenCache()
    fake = Fake(bearer_registry("https://auth.test/token", grant))
    assert (await fake.verify(tokens=tokens)).outcome == "accepted"
    verification = await fake.verify(tokens=tokens, secret="another-secret")
    assert verification.outcome == "rejected"


async def test_manifest_check_sends_all_four_media_types() -> None:
    def manifest(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, headers={"Docker-Content-Digest": DIGEST})

    fake = Fake(basic_registry(manifest))
    assert (await fake.verify(image="registry.test/team/app:v1")).outcome == (
        "accepted"
    )
    head = next(r for r in fake.requests if r.method == "HEAD")
    accepted = [part.strip() for part in head.headers["accept"].split(",")]
    assert accepted == list(MANIFEST_MEDIA_TYPES)


async def test_a_refused_head_is_read_again_with_get_for_the_message() -> None:
    denied = {"errors": [{"code": "DENIED", "message": "requested access denied"}]}

    def manifest(request: httpx.Request) -> httpx.Response:
        if request.method == "HEAD":
            return httpx.Response(403)
        return httpx.Response(403, json=denied)

    verification = await Fake(basic_registry(manifest)).verify(image="team/app")
    error = verification.error
    assert error is not None
    assert (error.code, error.registry_code) == ("credential_rejected", "DENIED")
    assert error.registry_message == "requested access denied"
    assert error.explanation.startswith(
        "The registry accepted the login but refused to let it read team/app"
    )


def not_found(request: httpx.Request) -> httpx.Response:
    body = {"errors": [{"code": "MANIFEST_UNKNOWN", "message": "manifest unknown"}]}
    return httpx.Response(404, json=body)


async def test_ghcr_not_found_means_not_found_or_no_access() -> None:
    verification = await Fake(basic_registry(not_found)).verify(
        registry="ghcr.io", image="octo/app:v1"
    )
    error = verification.error
    assert error is not None
    assert (error.code, error.registry_status) == ("credential_rejected", 404)
    assert "does not exist or this login may not read it" in error.explanation
    assert "read:packages" in error.explanation


async def test_elsewhere_a_missing_image_does_not_fail_the_login() -> None:
    verification = await Fake(basic_registry(not_found)).verify(image="team/app")
    assert verification.outcome == "accepted"


async def test_docker_hub_bare_names_live_under_library() -> None:
    fake = Fake(basic_registry(not_found))
    await fake.verify(registry="docker.io", image="nginx")
    head = next(r for r in fake.requests if r.method == "HEAD")
    assert str(head.url) == (
        "https://registry-1.docker.io/v2/library/nginx/manifests/latest"
    )


@pytest.mark.parametrize(
    ("image", "names"),
    [
        ("ghcr.io/team/app", "on ghcr.io, but the credential is for registry.test"),
        ("Team/App", "The repository path 'Team/App' must be lowercase."),
        ("team/app:bad!tag", "The tag 'bad!tag' may only contain"),
        ("team/app@sha256:1234", "'sha256:1234' is not a valid sha256 digest"),
    ],
)
async def test_a_bad_image_is_refused_before_any_call(image: str, names: str) -> None:
    fake = Fake(basic_registry())
    verification = await fake.verify(image=image)
    assert verification.error is not None
    assert verification.error.code == "invalid_request"
    assert names in verification.error.explanation
    assert fake.requests == []


async def test_an_invalid_google_key_is_refused_without_a_call() -> None:
    fake = Fake(basic_registry())
    verification = await fake.verify(
        registry="europe-docker.pkg.dev", username="_json_key", secret="{oops"
    )
    assert verification.error is not None
    assert verification.error.code == "credential_rejected"
    assert "not valid JSON" in verification.error.explanation
    assert fake.requests == []


async def test_an_invalid_registry_is_refused_with_its_sentence() -> None:
    fake = Fake(basic_registry())
    verification = await fake.verify(registry="https://ghcr.io")
    assert verification.error is not None
    assert verification.error.code == "invalid_registry"
    assert verification.error.explanation.startswith("Give the registry host")
    assert fake.requests == []


async def test_a_registry_echoing_the_credentials_never_gets_them_into_the_reply() -> (
    None
):
    def echo(request: httpx.Request) -> httpx.Response:
        sent = request.headers.get("authorization", "")
        if not sent:
            return httpx.Response(401, headers=BASIC)
        encoded = sent.partition(" ")[2]
        decoded = base64.b64decode(encoded).decode()
        message = f"bad login {sent} = {decoded} ({SECRET})"
        body = {"errors": [{"code": f"NOPE_{SECRET}", "message": message}]}
        return httpx.Response(401, headers=BASIC, json=body)

    verification = await Fake(echo).verify()
    reply = verification.model_dump_json()
    encoded = base64.b64encode(f"alice:{SECRET}".encode()).decode()
    assert SECRET not in reply
    assert encoded not in reply
    assert verification.error is not None
    assert "[redacted]" in (verification.error.registry_message or "")


async def test_slow_answers_end_within_the_time_budget() -> None:
    async def slow(request: httpx.Request) -> httpx.Response:
        await asyncio.sleep(30)
        return httpx.Response(200)

    fake = Fake(slow)
    started = time.monotonic()
    verification = await fake.verify(settings=Settings(registry_timeout_s=0.5))
    assert time.monotonic() - started < 2.0
    assert verification.error is not None
    assert verification.error.code == "registry_unreachable"
    assert verification.error.explanation == (
        "registry.test did not answer within 0.5 s."
    )
