"""The request-forgery guard: address classes, the allow-list, the connect path."""

import ipaddress
import ssl
from collections.abc import Iterable

import httpcore
import httpx
import pytest

from services.registry.errors import (
    InvalidAllowEntryError,
    RegistryAddressForbiddenError,
)
from services.registry.guard import (
    AddressGuard,
    GuardedBackend,
    GuardedTransport,
    IPAddress,
    Resolver,
    address_class,
)

PUBLIC = ipaddress.ip_address("93.184.216.34")
LOOPBACK = ipaddress.ip_address("127.0.0.1")


def ip(text: str) -> IPAddress:
    return ipaddress.ip_address(text)


@pytest.mark.parametrize(
    ("address", "kind"),
    [
        ("127.0.0.1", "loopback"),
        ("127.8.9.10", "loopback"),
        ("::1", "loopback"),
        ("::ffff:127.0.0.1", "loopback"),
        ("10.1.2.3", "private"),
        ("172.16.5.4", "private"),
        ("192.168.1.1", "private"),
        ("::ffff:192.168.1.1", "private"),
        ("169.254.1.1", "link-local"),
        ("fe80::1", "link-local"),
        ("fd12:3456::1", "unique-local"),
        ("fc00::1", "unique-local"),
        ("0.0.0.0", "unspecified"),
        ("::", "unspecified"),
        ("224.0.0.1", "multicast"),
        ("ff02::1", "multicast"),
        ("169.254.169.254", "metadata"),
        ("fd00:ec2::254", "metadata"),
        ("::ffff:169.254.169.254", "metadata"),
        ("100.64.0.1", "not publicly routable"),
        ("192.0.2.1", "address"),
        ("240.0.0.1", "address"),
        ("255.255.255.255", "address"),
    ],
)
def test_unsafe_address_classes(address: str, kind: str) -> None:
    found = address_class(ip(address))
    assert found is not None
    assert kind in found


@pytest.mark.parametrize(
    "address", ["93.184.216.34", "8.8.8.8", "2606:4700:4700::1111", "::ffff:8.8.8.8"]
)
def test_public_addresses_pass(address: str) -> None:
    assert address_class(ip(address)) is None
    assert AddressGuard().refusal("registry.example", 443, ip(address)) is None


def test_nothing_unsafe_is_allowed_by_default() -> None:
    guard = AddressGuard()
    assert guard.refusal("127.0.0.1", 5000, LOOPBACK) == "a loopback address"


@pytest.mark.parametrize(
    ("entry", "host", "port", "address", "allowed"),
    [
        ("127.0.0.1", "127.0.0.1", 5000, "127.0.0.1", True),
        ("127.0.0.1", "localhost", 5000, "127.0.0.1", True),
        ("127.0.0.1", "127.0.0.2", 5000, "127.0.0.2", False),
        ("127.0.0.0/8", "127.0.0.2", 5000, "127.0.0.2", True),
        ("10.0.0.0/8", "registry.corp", 443, "10.1.2.3", True),
        ("10.0.0.0/8", "registry.corp", 443, "192.168.1.1", False),
        ("::1", "::1", 5000, "::1", True),
        ("127.0.0.1", "x", 5000, "::ffff:127.0.0.1", True),
        ("fd00::/8", "registry.corp", 443, "fd12::1", True),
        ("registry.corp", "registry.corp", 443, "10.1.2.3", True),
        ("registry.corp", "REGISTRY.corp", 443, "10.1.2.3", True),
        ("registry.corp", "evil.example", 443, "10.1.2.3", False),
        ("registry.corp:5000", "registry.corp", 5000, "10.1.2.3", True),
        ("registry.corp:5000", "registry.corp", 5001, "10.1.2.3", False),
        ("127.0.0.1:5000", "127.0.0.1", 5000, "127.0.0.1", True),
        ("127.0.0.1:5000", "127.0.0.1", 6000, "127.0.0.1", False),
        ("[::1]:5000", "::1", 5000, "::1", True),
        ("169.254.0.0/16", "meta", 80, "169.254.169.254", False),
        ("0.0.0.0/0", "meta", 80, "169.254.169.254", False),
        ("169.254.169.254", "meta", 80, "169.254.169.254", True),
        ("fd00:ec2::254", "meta", 80, "fd00:ec2::254", True),
    ],
)
def test_allow_list_entries(
    entry: str, host: str, port: int, address: str, allowed: bool
) -> None:
    guard = AddressGuard([entry])
    assert (guard.refusal(host, port, ip(address)) is None) is allowed


@pytest.mark.parametrize("entry", ["https://registry.corp", "10.0.0.0/33x", "a b"])
def test_an_unreadable_allow_entry_fails_at_start(entry: str) -> None:
    with pytest.raises(InvalidAllowEntryError, match="allow_registries"):
        AddressGuard([entry])


def fake_resolver(
    answers: dict[str, list[list[str]]],
) -> tuple[list[str], Resolver]:
    """A resolver answering each host from a script, one answer per call."""
    asked: list[str] = []

    async def resolve(host: str, port: int) -> list[IPAddress]:
        asked.append(host)
        script = answers[host]
        step = script.pop(0) if len(script) > 1 else script[0]
        return [ip(a) for a in step]

    return asked, resolve


async def test_resolve_keeps_only_allowed_addresses() -> None:
    _, resolve = fake_resolver({"mixed.example": [["127.0.0.1", str(PUBLIC)]]})
    guard = AddressGuard(resolver=resolve)
    assert await guard.resolve("mixed.example", 443) == [PUBLIC]


async def test_a_name_that_leads_only_inside_is_refused() -> None:
    _, resolve = fake_resolver({"inside.example": [["10.0.0.5", "fd00::5"]]})
    guard = AddressGuard(resolver=resolve)
    with pytest.raises(RegistryAddressForbiddenError) as caught:
        await guard.resolve("inside.example", 443)
    assert "The host inside.example resolves to 10.0.0.5, a private address" in str(
        caught.value
    )
    assert "allow_registries" in str(caught.value)


async def test_the_real_resolver_sees_localhost_as_loopback() -> None:
    with pytest.raises(RegistryAddressForbiddenError, match="loopback"):
        await AddressGuard().resolve("localhost", 5000)


class RecordingStream(httpcore.AsyncNetworkStream):
    def __init__(self, response: bytes, log: "RecordingBackend") -> None:
        self._response = [response]
        self._log = log

    async def read(
        self,
        max_bytes: int,
        timeout: float | None = None,  # noqa: ASYNC109
    ) -> bytes:
        return self._response.pop(0) if self._response else b""

    async def write(
        self,
        buffer: bytes,
        timeout: float | None = None,  # noqa: ASYNC109
    ) -> None:
        self._log.written.append(buffer)

    async def aclose(self) -> None:
        return None

    async def start_tls(
        self,
        ssl_context: ssl.SSLContext,
        server_hostname: str | None = None,
        timeout: float | None = None,  # noqa: ASYNC109
    ) -> httpcore.AsyncNetworkStream:
        self._log.sni.append(server_hostname)
        return self


class RecordingBackend(httpcore.AsyncNetworkBackend):
    """Stands in for sockets: records where connections go and what is sent."""

    def __init__(self) -> None:
        self.connected: list[tuple[str, int]] = []
        self.written: list[bytes] = []
        self.sni: list[str | None] = []

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,  # noqa: ASYNC109
        local_address: str | None = None,
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        self.connected.append((host, port))
        response = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}"
        return RecordingStream(response, self)

    async def sleep(self, seconds: float) -> None:
        return None


async def test_rebinding_between_calls_cannot_reach_loopback() -> None:
    asked, resolve = fake_resolver(
        {"rebind.example": [[str(PUBLIC)], ["127.0.0.1"], ["127.0.0.1"]]}
    )
    inner = RecordingBackend()
    backend = GuardedBackend(AddressGuard(resolver=resolve), inner)
    await backend.connect_tcp("rebind.example", 443)
    with pytest.raises(RegistryAddressForbiddenError):
        await backend.connect_tcp("rebind.example", 443)
    assert inner.connected == [(str(PUBLIC), 443)]
    assert asked == ["rebind.example", "rebind.example"]


async def test_transport_connects_to_the_checked_address_with_the_real_name() -> None:
    _, resolve = fake_resolver({"registry.example": [[str(PUBLIC)]]})
    inner = RecordingBackend()
    guard = AddressGuard(resolver=resolve)
    async with httpx.AsyncClient(
        transport=GuardedTransport(guard, inner=inner)
    ) as client:
        response = await client.get("https://registry.example/v2/")
    assert response.status_code == 200
    assert inner.connected == [(str(PUBLIC), 443)]
    assert inner.sni == ["registry.example"]
    request_head = b"".join(inner.written)
    assert b"Host: registry.example\r\n" in request_head


async def test_transport_refuses_before_any_connection() -> None:
    _, resolve = fake_resolver({"inside.example": [["10.0.0.7"]]})
    inner = RecordingBackend()
    guard = AddressGuard(resolver=resolve)
    async with httpx.AsyncClient(
        transport=GuardedTransport(guard, inner=inner)
    ) as client:
        with pytest.raises(RegistryAddressForbiddenError):
            await client.get("http://inside.example:5000/v2/")
    assert inner.connected == []
