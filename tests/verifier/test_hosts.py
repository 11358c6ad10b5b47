"""Registry hosts as users type them: accepted forms, refusals, known hosts."""

from collections.abc import Callable

import pytest
from hypothesis import given
from hypothesis import strategies as st

from services.registry.errors import InvalidRegistryError
from services.registry.hosts import RegistryHost, RegistryKind, parse_registry

LABEL = st.from_regex(r"[a-z0-9]([a-z0-9-]{0,8}[a-z0-9])?", fullmatch=True)
TOP_LABEL = st.from_regex(r"[a-z]([a-z0-9-]{0,6}[a-z0-9])?", fullmatch=True)
PORT = st.none() | st.integers(1, 65535)


@st.composite
def hostnames(draw: st.DrawFn) -> str:
    labels = draw(st.lists(LABEL, min_size=0, max_size=4))
    return ".".join([*labels, draw(TOP_LABEL)])


@st.composite
def typed_hosts(draw: st.DrawFn) -> str:
    """Any host form a user may legitimately type, with optional port."""
    kind = draw(st.sampled_from(["name", "ipv4", "ipv6"]))
    if kind == "name":
        host = draw(hostnames())
        if draw(st.booleans()):
            host = host.upper()
    elif kind == "ipv4":
        host = str(draw(st.ip_addresses(v=4)))
    else:
        host = f"[{draw(st.ip_addresses(v=6))}]"
    port = draw(PORT)
    return host if port is None else f"{host}:{port}"


@pytest.mark.parametrize(
    ("typed", "name", "host", "port", "kind"),
    [
        ("ghcr.io", "ghcr.io", "ghcr.io", None, RegistryKind.GHCR),
        ("GHCR.io:443", "ghcr.io", "ghcr.io", None, RegistryKind.GHCR),
        (
            "registry.example:5000",
            "registry.example:5000",
            "registry.example",
            5000,
            RegistryKind.GENERIC,
        ),
        ("127.0.0.1:5000", "127.0.0.1:5000", "127.0.0.1", 5000, RegistryKind.GENERIC),
        (
            "docker.io",
            "docker.io",
            "registry-1.docker.io",
            None,
            RegistryKind.DOCKER_HUB,
        ),
        (
            "index.docker.io",
            "docker.io",
            "registry-1.docker.io",
            None,
            RegistryKind.DOCKER_HUB,
        ),
        (
            "registry-1.docker.io",
            "docker.io",
            "registry-1.docker.io",
            None,
            RegistryKind.DOCKER_HUB,
        ),
        ("[::1]:5000", "[::1]:5000", "::1", 5000, RegistryKind.GENERIC),
        ("[0:0::1]", "[::1]", "::1", None, RegistryKind.GENERIC),
        (
            "registry.gitlab.com",
            "registry.gitlab.com",
            "registry.gitlab.com",
            None,
            RegistryKind.GITLAB,
        ),
        (
            "europe-west1-docker.pkg.dev",
            "europe-west1-docker.pkg.dev",
            "europe-west1-docker.pkg.dev",
            None,
            RegistryKind.GOOGLE,
        ),
        ("gcr.io", "gcr.io", "gcr.io", None, RegistryKind.GOOGLE),
        ("eu.gcr.io", "eu.gcr.io", "eu.gcr.io", None, RegistryKind.GOOGLE),
        (
            "123456789012.dkr.ecr.eu-west-1.amazonaws.com",
            "123456789012.dkr.ecr.eu-west-1.amazonaws.com",
            "123456789012.dkr.ecr.eu-west-1.amazonaws.com",
            None,
            RegistryKind.ECR,
        ),
        ("localhost:5000", "localhost:5000", "localhost", 5000, RegistryKind.GENERIC),
        ("registry.example.", "registry.example", "registry.example", None, None),
        ("ghcr.io:8443", "ghcr.io:8443", "ghcr.io", 8443, RegistryKind.GENERIC),
    ],
)
def test_typed_hosts_are_normalised(
    typed: str, name: str, host: str, port: int | None, kind: RegistryKind | None
) -> None:
    registry = parse_registry(typed)
    assert (registry.name, registry.host, registry.port) == (name, host, port)
    assert kind is None or registry.kind is kind
    assert registry.scheme == "https"


def test_docker_hub_calls_its_api_host() -> None:
    assert parse_registry("docker.io").base_url == "https://registry-1.docker.io"


def test_scheme_is_http_only_for_insecure_registries() -> None:
    insecure = ["127.0.0.1:5000", "registry.local"]
    assert parse_registry("127.0.0.1:5000", insecure=insecure).base_url == (
        "http://127.0.0.1:5000"
    )
    assert parse_registry("127.0.0.1:5001", insecure=insecure).scheme == "https"
    assert parse_registry("registry.local:9000", insecure=insecure).scheme == "http"
    assert parse_registry("[::1]:5000", insecure=["[::1]:5000"]).base_url == (
        "http://[::1]:5000"
    )


@pytest.mark.parametrize(
    ("typed", "names"),
    [
        ("", "empty"),
        ("ghcr.io ", "space"),
        (" ghcr.io", "space"),
        ("ghcr\tio", "space"),
        ("ghcr.io\x00", "control"),
        ("https://ghcr.io", "without 'https://'"),
        ("http://127.0.0.1:5000", "without 'http://'"),
        ("ghcr.io/team/app", "no path"),
        ("ghcr.io?x=1", "no path"),
        ("alice:pw@ghcr.io", "username"),
        ("alice@ghcr.io", "username"),
        ("ghcr.io:", "port after ':' is missing"),
        ("ghcr.io:http", "'http' is not a number"),
        ("ghcr.io:0", "outside the range"),
        ("ghcr.io:65536", "outside the range"),
        ("ghcr.io:99999999999", "outside the range"),
        (":5000", "missing before the port"),
        ("a:b:c", "more than one ':'"),
        ("::1", "brackets"),
        ("[::1", "closing ']'"),
        ("[::1]5000", "Only a port"),
        ("[not-v6]:5000", "not a valid IPv6"),
        ("[fe80::1%eth0]:5000", "zone"),
        ("1.2.3", "not a valid IPv4"),
        ("256.1.1.1", "not a valid IPv4"),
        ("registry.123", "all digits"),
        ("reg_istry.example", "'_'"),
        ("-registry.example", "hyphen"),
        ("registry-.example", "hyphen"),
        ("registry..example", "empty label"),
        (".registry.example", "empty label"),
        ("a" * 64 + ".example", "63"),
        (".".join(["a" * 60] * 5), "253"),
        ("x" * 400, "characters long"),
        ("régistry.example", "xn--"),
    ],
)
def test_refusals_say_what_is_wrong(typed: str, names: str) -> None:
    with pytest.raises(InvalidRegistryError) as caught:
        parse_registry(typed)
    assert names in caught.value.detail
    assert caught.value.detail.endswith(".")


def test_refusal_never_echoes_user_info() -> None:
    with pytest.raises(InvalidRegistryError) as caught:
        parse_registry("https://alice:s3cr3t-token@ghcr.io")
    assert "s3cr3t" not in str(caught.value)


@given(typed_hosts())
def test_every_accepted_host_round_trips(typed: str) -> None:
    registry = parse_registry(typed)
    again = parse_registry(registry.name)
    assert again == registry
    assert parse_registry(registry.netloc).host == registry.host


@given(hostnames(), PORT)
def test_host_names_are_case_insensitive(host: str, port: int | None) -> None:
    typed = host if port is None else f"{host}:{port}"
    assert parse_registry(typed.upper()) == parse_registry(typed)


def _sentence(detail: str) -> bool:
    return 20 <= len(detail) <= 300 and detail.endswith(".") and "\n" not in detail


@given(st.text(max_size=80))
def test_any_text_is_accepted_and_round_trips_or_refused_with_a_sentence(
    typed: str,
) -> None:
    try:
        registry = parse_registry(typed)
    except InvalidRegistryError as exc:
        assert _sentence(exc.detail), exc.detail
    else:
        assert isinstance(registry, RegistryHost)
        assert parse_registry(registry.name) == registry


FAULTS: dict[str, tuple[Callable[[str], str], str]] = {
    "scheme": (lambda host: f"https://{host}", "without 'https://'"),
    "path": (lambda host: f"{host}/team/app", "no path"),
    "user": (lambda host: f"alice@{host}", "username"),
    "space": (lambda host: f"{host} ", "space or a control character"),
    "control": (lambda host: f"{host}\x7f", "space or a control character"),
    "port": (lambda host: f"{host}:70000", "outside the range"),
    "port text": (lambda host: f"{host}:port", "is not a number"),
    "label": (lambda host: f"under_score.{host}", "'_'"),
}


@given(hostnames(), st.sampled_from(sorted(FAULTS)))
def test_each_fault_is_named(host: str, fault: str) -> None:
    make, names = FAULTS[fault]
    with pytest.raises(InvalidRegistryError) as caught:
        parse_registry(make(host))
    assert names in caught.value.detail
    assert _sentence(caught.value.detail)


def test_known_registries_explain_their_logins() -> None:
    assert "read:packages" in parse_registry("ghcr.io").advice
    assert "read_registry" in parse_registry("registry.gitlab.com").advice
    assert "_json_key" in parse_registry("us-docker.pkg.dev").advice
    ecr = parse_registry("123456789012.dkr.ecr.us-east-1.amazonaws.com").advice
    assert "AWS" in ecr
    assert "aws ecr get-login-password" in ecr
    assert "12 hours" in ecr
    assert parse_registry("registry.example").advice == ""
