"""The request-forgery guard: a user names the host, so we check where it leads.

The check runs in the network backend, on the addresses a connection is about to
use, and the connection goes to the very address that was checked: a DNS answer
that changes between the check and the connect cannot slip past it.
"""

import asyncio
import ipaddress
import socket
import ssl
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass

import httpcore
import httpx

from services.backbone.settings import Settings
from services.registry.errors import (
    InvalidAllowEntryError,
    InvalidRegistryError,
    RegistryAddressForbiddenError,
    RegistryUnreachableError,
)
from services.registry.hosts import format_netloc, split_host_port

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
Resolver = Callable[[str, int], Awaitable[list[IPAddress]]]

METADATA_ADDRESSES: frozenset[IPAddress] = frozenset(
    {
        ipaddress.IPv4Address("169.254.169.254"),
        ipaddress.IPv4Address("169.254.170.2"),
        ipaddress.IPv4Address("100.100.100.200"),
        ipaddress.IPv6Address("fd00:ec2::254"),
    }
)
_UNIQUE_LOCAL = ipaddress.IPv6Network("fc00::/7")


async def system_resolver(host: str, port: int) -> list[IPAddress]:
    """Resolve ``host`` with the system resolver, as a connect would."""
    loop = asyncio.get_running_loop()
    try:
        infos = await loop.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP
        )
    except socket.gaierror as exc:
        raise RegistryUnreachableError(
            f"The host {host} could not be resolved: {exc.strerror}."
        ) from exc
    found: list[IPAddress] = []
    for _family, _type, _proto, _name, sockaddr in infos:
        address = ipaddress.ip_address(str(sockaddr[0]).partition("%")[0])
        if address not in found:
            found.append(address)
    return found


def address_class(address: IPAddress) -> str | None:
    """The class that makes ``address`` unsafe to call, or None if it is public."""
    if isinstance(address, ipaddress.IPv6Address):
        embedded = address.ipv4_mapped or _ipv4_compatible(address)
        if embedded is not None:
            return address_class(embedded)
    checks: list[tuple[bool, str]] = [
        (address in METADATA_ADDRESSES, "a cloud metadata address"),
        (address.is_unspecified, "an unspecified address"),
        (address.is_loopback, "a loopback address"),
        (address.is_link_local, "a link-local address"),
        (address.is_multicast, "a multicast address"),
        (
            isinstance(address, ipaddress.IPv6Address) and address in _UNIQUE_LOCAL,
            "a unique-local address",
        ),
        (address.is_private, "a private address"),
        (address.is_reserved, "a reserved address"),
        (not address.is_global, "an address that is not publicly routable"),
    ]
    return next((name for hit, name in checks if hit), None)


def _ipv4_compatible(address: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    if int(address) >> 32 == 0 and int(address) > 1:
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return None


@dataclass(frozen=True)
class AllowEntry:
    """One ``allow_registries`` entry: a network, or a host with maybe a port."""

    network: IPNetwork | None = None
    host: str | None = None
    port: int | None = None

    @classmethod
    def parse(cls, text: str) -> "AllowEntry":
        """Read ``host``, ``host:port``, an IP, ``[v6]:port`` or a CIDR."""
        text = text.strip()
        try:
            return cls(network=ipaddress.ip_network(text, strict=False))
        except ValueError:
            pass
        try:
            host, port = split_host_port(text)
        except InvalidRegistryError as exc:
            raise InvalidAllowEntryError(
                f"The allow_registries entry '{text[:80]}' is not a host, "
                f"host:port, IP address or CIDR: {exc.detail}"
            ) from exc
        try:
            network = ipaddress.ip_network(host)
        except ValueError:
            return cls(host=host, port=port)
        return cls(network=network, host=host, port=port)

    def covers(self, host: str, port: int, address: IPAddress | None) -> bool:
        """Whether this entry opens ``host:port`` reached at ``address``."""
        if self.port is not None and self.port != port:
            return False
        if self.host is not None and self.host == host.lower():
            return True
        if self.network is None or address is None:
            return False
        return _unmapped(address) in self.network or address in self.network


def _unmapped(address: IPAddress) -> IPAddress:
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        return address.ipv4_mapped
    return address


class AddressGuard:
    """Decide which addresses of a host may be called, and resolve to those."""

    def __init__(
        self, allow: Iterable[str] = (), *, resolver: Resolver | None = None
    ) -> None:
        self._allow = [AllowEntry.parse(entry) for entry in allow if entry.strip()]
        self._resolver = resolver or system_resolver

    @classmethod
    def from_settings(
        cls, settings: Settings, *, resolver: Resolver | None = None
    ) -> "AddressGuard":
        return cls(settings.allow_registries, resolver=resolver)

    def refusal(self, host: str, port: int, address: IPAddress) -> str | None:
        """Why ``address`` may not be called for ``host:port``, or None."""
        unsafe = address_class(address)
        if unsafe is None:
            return None
        if address in METADATA_ADDRESSES or _unmapped(address) in METADATA_ADDRESSES:
            opened = any(
                entry.network is not None
                and entry.network.num_addresses == 1
                and _unmapped(address) in entry.network
                for entry in self._allow
            )
        else:
            opened = any(entry.covers(host, port, address) for entry in self._allow)
        return None if opened else unsafe

    async def resolve(self, host: str, port: int) -> list[IPAddress]:
        """The addresses of ``host`` that may be called; raise if there are none."""
        try:
            addresses = [ipaddress.ip_address(host)]
        except ValueError:
            addresses = await self._resolver(host, port)
        if not addresses:
            raise RegistryUnreachableError(f"The host {host} has no address.")
        allowed = [a for a in addresses if self.refusal(host, port, a) is None]
        if allowed:
            return allowed
        first = addresses[0]
        unsafe = self.refusal(host, port, first)
        leads = (
            f"is {unsafe}" if str(first) == host else f"resolves to {first}, {unsafe}"
        )
        raise RegistryAddressForbiddenError(
            f"The host {format_netloc(host, None)} {leads}; registries must be "
            "on public addresses unless allow_registries lists them."
        )

    async def check_url(self, url: httpx.URL) -> None:
        """Refuse a URL whose host only leads to refused addresses."""
        port = url.port or (443 if url.scheme == "https" else 80)
        await self.resolve(url.host, port)


class GuardedBackend(httpcore.AsyncNetworkBackend):
    """A network backend that connects only to addresses the guard allows."""

    def __init__(
        self, guard: AddressGuard, inner: httpcore.AsyncNetworkBackend | None = None
    ) -> None:
        self._guard = guard
        self._inner = inner or httpcore.AnyIOBackend()

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,  # noqa: ASYNC109 (httpcore's signature)
        local_address: str | None = None,
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        """Resolve and check ``host``, then connect to a checked address."""
        try:
            async with asyncio.timeout(timeout):
                addresses = await self._guard.resolve(host, port)
        except TimeoutError as exc:
            raise httpcore.ConnectTimeout(f"resolving {host} timed out") from exc
        failure: Exception | None = None
        for address in addresses:
            try:
                return await self._inner.connect_tcp(
                    str(address),
                    port,
                    timeout=timeout,
                    local_address=local_address,
                    socket_options=socket_options,
                )
            except (httpcore.ConnectError, httpcore.ConnectTimeout) as exc:
                failure = exc
        assert failure is not None
        raise failure

    async def connect_unix_socket(
        self,
        path: str,
        timeout: float | None = None,  # noqa: ASYNC109 (httpcore's signature)
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        raise RegistryAddressForbiddenError("Registries are not reached by socket.")

    async def sleep(self, seconds: float) -> None:
        await self._inner.sleep(seconds)


class GuardedTransport(httpx.AsyncHTTPTransport):
    """An httpx transport whose every connection passes the guard.

    TLS still verifies and sends SNI for the host name in the URL, and the Host
    header stays the URL's: only the socket goes to the checked address.
    """

    def __init__(
        self,
        guard: AddressGuard,
        *,
        verify: ssl.SSLContext | bool = True,
        inner: httpcore.AsyncNetworkBackend | None = None,
    ) -> None:
        super().__init__(verify=verify, trust_env=False)
        self._pool = httpcore.AsyncConnectionPool(
            ssl_context=httpx.create_ssl_context(verify=verify),
            max_connections=20,
            max_keepalive_connections=5,
            keepalive_expiry=5.0,
            network_backend=GuardedBackend(guard, inner),
        )
