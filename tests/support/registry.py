"""A real distribution registry on loopback, its token issuer, and image pushes.

``LocalRegistry`` runs ``docker-registry serve`` (CNCF distribution) with either
htpasswd Basic auth or Docker token auth backed by ``TokenIssuer``. The push
helpers speak the distribution API with httpx, so no skopeo or Docker is needed.
"""

from __future__ import annotations

import base64
import datetime as dt
import fnmatch
import gzip
import hashlib
import hmac
import io
import json
import os
import re
import secrets
import shutil
import subprocess
import tarfile
import tempfile
import threading
import time
from collections.abc import Generator, Mapping, Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path, PurePosixPath
from types import TracebackType
from typing import Any, Literal, Self
from urllib.parse import parse_qs, urljoin, urlsplit

import httpx
import jwt
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID

from services.backbone.embedded import free_port, log_tail, stop_process

ADMIN = ("admin", "admin-pass")
ALICE = ("alice", "alice-pass")
NOBODY = ("nobody", "nobody-pass")

OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER = "application/vnd.docker.image.rootfs.diff.tar.gzip"
IN_TOTO = "application/vnd.in-toto+json"
ALL_MANIFEST_TYPES = (OCI_INDEX, DOCKER_LIST, OCI_MANIFEST, DOCKER_MANIFEST)
ACCEPT_ALL = ", ".join(ALL_MANIFEST_TYPES)

START_TIMEOUT_S = 10.0
ALL_ACTIONS = ("pull", "push", "delete", "*")
UNAUTHORIZED_BODY = {
    "errors": [{"code": "UNAUTHORIZED", "message": "authentication required"}]
}


def sha256_digest(data: bytes) -> str:
    """``sha256:<hex>`` of ``data``."""
    return "sha256:" + hashlib.sha256(data).hexdigest()


def libtrust_key_id(key: rsa.RSAPublicKey) -> str:
    """Key ID as distribution 2.x expects it in the JWT ``kid`` header."""
    der = key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    encoded = base64.b32encode(hashlib.sha256(der).digest()[:30]).decode()
    encoded = encoded.rstrip("=")
    return ":".join(encoded[i : i + 4] for i in range(0, len(encoded), 4))


@dataclass
class _Account:
    password: str
    repos: dict[str, list[str]] | None


class _TokenServer(ThreadingHTTPServer):
    daemon_threads = True
    issuer: TokenIssuer


class _TokenHandler(BaseHTTPRequestHandler):
    server: _TokenServer

    def do_GET(self) -> None:
        status, headers, body = self.server.issuer.handle(
            self.path, self.headers.get("Authorization", "")
        )
        payload = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        for name, value in headers.items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, format: str, *args: Any) -> None:
        """Keep test output quiet."""


class TokenIssuer:
    """Docker token server: ``GET /token?service=..&scope=..`` with Basic auth.

    Unknown users and wrong passwords get 401. Known users get a token for the
    intersection of the requested scope and what they may do, possibly with no
    actions at all, as real token servers do. ``repos`` maps repository names
    (``fnmatch`` patterns) to allowed actions; ``None`` allows everything.
    """

    def __init__(
        self,
        directory: Path,
        *,
        service: str = "crabglamp-test-registry",
        issuer: str = "crabglamp-test-issuer",
        expires_in: int = 300,
    ) -> None:
        self.directory = Path(directory)
        self.service = service
        self.issuer = issuer
        self.expires_in = expires_in
        self.requests: list[tuple[str, str]] = []
        self._accounts: dict[str, _Account] = {}
        self._lock = threading.Lock()
        self._key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.key_id = libtrust_key_id(self._key.public_key())
        self._server: _TokenServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def cert_path(self) -> Path:
        """The ``rootcertbundle`` for the registry: the signing key's cert."""
        return self.directory / "token-issuer.pem"

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("token issuer has not been started")
        return int(self._server.server_address[1])

    @property
    def realm(self) -> str:
        return f"http://127.0.0.1:{self.port}/token"

    def add_user(
        self, name: str, password: str, repos: Mapping[str, list[str]] | None = None
    ) -> None:
        with self._lock:
            self._accounts[name] = _Account(
                password, None if repos is None else dict(repos)
            )

    def revoke(self, name: str) -> None:
        """Refuse tokens to ``name`` from now on (issued ones stay valid)."""
        with self._lock:
            self._accounts.pop(name, None)

    def start(self) -> Self:
        if self._server is not None:
            return self
        self.directory.mkdir(parents=True, exist_ok=True)
        self.cert_path.write_bytes(self._certificate())
        server = _TokenServer(("127.0.0.1", 0), _TokenHandler)
        server.issuer = self
        self._thread = threading.Thread(
            target=server.serve_forever, name="token-issuer", daemon=True
        )
        self._server = server
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is None:
            return
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(5)
        self._server = self._thread = None

    def _certificate(self) -> bytes:
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, self.issuer)])
        now = dt.datetime.now(dt.UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(self._key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(days=1))
            .not_valid_after(now + dt.timedelta(days=3650))
            .sign(self._key, hashes.SHA256())
        )
        return cert.public_bytes(serialization.Encoding.PEM)

    def handle(
        self, path: str, authorization: str
    ) -> tuple[int, dict[str, str], dict[str, Any]]:
        """Answer one request: (status, extra headers, JSON body)."""
        url = urlsplit(path)
        if url.path != "/token":
            return 404, {}, {"errors": [{"code": "NOT_FOUND", "message": path}]}
        query = parse_qs(url.query)
        scopes = [s for value in query.get("scope", []) for s in value.split()]
        user, password = _parse_basic(authorization)
        with self._lock:
            self.requests.append((user, " ".join(scopes)))
            account = self._accounts.get(user)
        if account is None or not hmac.compare_digest(
            account.password.encode(), password.encode()
        ):
            challenge = {"WWW-Authenticate": f'Basic realm="{self.issuer}"'}
            return 401, challenge, UNAUTHORIZED_BODY
        return 200, {}, self.issue(user, [_grant(account, s) for s in scopes])

    def issue(self, subject: str, access: list[dict[str, Any]]) -> dict[str, Any]:
        """Sign a token for ``subject`` with exactly ``access``."""
        now = int(time.time())
        claims = {
            "iss": self.issuer,
            "sub": subject,
            "aud": self.service,
            "exp": now + self.expires_in,
            "nbf": now - 1,
            "iat": now,
            "jti": secrets.token_hex(16),
            "access": access,
        }
        token = jwt.encode(
            claims, self._key, algorithm="RS256", headers={"kid": self.key_id}
        )
        issued = dt.datetime.fromtimestamp(now, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        return {
            "token": token,
            "access_token": token,
            "expires_in": self.expires_in,
            "issued_at": issued,
        }

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()


def _parse_basic(authorization: str) -> tuple[str, str]:
    scheme, _, value = authorization.partition(" ")
    if scheme.lower() != "basic":
        return "", ""
    try:
        decoded = base64.b64decode(value.strip(), validate=True).decode()
    except ValueError:
        return "", ""
    user, _, password = decoded.partition(":")
    return user, password


def _grant(account: _Account, scope: str) -> dict[str, Any]:
    kind, _, rest = scope.partition(":")
    name, _, actions = rest.rpartition(":")
    requested = [action for action in actions.split(",") if action]
    if account.repos is None:
        allowed: set[str] = set(ALL_ACTIONS)
    elif kind != "repository":
        allowed = set()
    else:
        allowed = {
            action
            for pattern, granted in account.repos.items()
            if fnmatch.fnmatchcase(name, pattern)
            for action in granted
        }
    if "*" in allowed:
        allowed.update(ALL_ACTIONS)
    return {
        "type": kind,
        "name": name,
        "actions": [a for a in requested if a in allowed],
    }


def registry_binary() -> str:
    """``docker-registry`` (Debian) or ``registry`` (upstream) from ``PATH``."""
    for name in ("docker-registry", "registry"):
        found = shutil.which(name)
        if found:
            return found
    raise RuntimeError("docker-registry not found; run scripts/install-system-deps.sh")


def htpasswd_line(name: str, password: str) -> str:
    """One bcrypt htpasswd line, made by ``htpasswd -Bbn``."""
    result = subprocess.run(
        ["htpasswd", "-Bbn", name, password],
        capture_output=True,
        text=True,
        check=True,
    )
    return result.stdout.strip()


class LocalRegistry:
    """``docker-registry serve`` on ``127.0.0.1`` with filesystem storage.

    ``auth="htpasswd"``: every authenticated user may pull and push anything;
    distribution re-reads the htpasswd file when its mtime changes, so
    ``add_user`` and ``revoke`` take effect on the next request.
    ``auth="token"``: Bearer flow through ``TokenIssuer`` with per-user access.
    """

    def __init__(
        self,
        directory: Path | None = None,
        *,
        auth: Literal["htpasswd", "token"] = "htpasswd",
        users: Mapping[str, str] | None = None,
        port: int | None = None,
    ) -> None:
        self._owns_directory = directory is None
        self.directory = Path(directory or tempfile.mkdtemp(prefix="crabglamp-reg-"))
        self.auth = auth
        self.users: dict[str, str] = {}
        self.port = port
        self._fixed_port = port
        self.process: subprocess.Popen[bytes] | None = None
        self.issuer = TokenIssuer(self.directory) if auth == "token" else None
        for name, password in (users or {}).items():
            self.add_user(name, password)

    @property
    def host(self) -> str:
        """``127.0.0.1:PORT``, the registry part of image references."""
        if self.port is None:
            raise RuntimeError("registry has not been started")
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.host}"

    @property
    def log_path(self) -> Path:
        return self.directory / "registry.log"

    @property
    def htpasswd_path(self) -> Path:
        return self.directory / "htpasswd"

    def add_user(
        self, name: str, password: str, repos: Mapping[str, list[str]] | None = None
    ) -> None:
        """Add or replace a user; ``repos`` (token mode only) limits access."""
        if self.issuer is None and repos is not None:
            raise ValueError("htpasswd auth cannot limit access per repository")
        self.users[name] = password
        if self.issuer is not None:
            self.issuer.add_user(name, password, repos)
        elif self.process is not None:
            self._write_htpasswd()

    def revoke(self, name: str) -> None:
        """Make ``name``'s credentials fail from now on."""
        self.users.pop(name, None)
        if self.issuer is not None:
            self.issuer.revoke(name)
        elif self.process is not None:
            self._write_htpasswd()

    def start(self) -> Self:
        """Start the registry and wait until ``/v2/`` answers."""
        if self.process is not None and self.process.poll() is None:
            return self
        binary = registry_binary()
        self.directory.mkdir(parents=True, exist_ok=True)
        if self.issuer is not None:
            self.issuer.start()
        else:
            self._write_htpasswd()
        for _ in range(3):
            port = self._fixed_port or free_port()
            config = self.directory / "config.yml"
            config.write_text(json.dumps(self._config(port), indent=2))
            with self.log_path.open("ab") as log_file:
                process = subprocess.Popen(
                    [binary, "serve", str(config)],
                    stdin=subprocess.DEVNULL,
                    stdout=log_file,
                    stderr=subprocess.STDOUT,
                    cwd=self.directory,
                    start_new_session=True,
                )
            if _wait_for_v2(process, port):
                self.process, self.port = process, port
                return self
            timed_out = process.poll() is None
            stop_process(process)
            if timed_out or self._fixed_port is not None:
                break
        if self.issuer is not None:
            self.issuer.stop()
        raise RuntimeError(f"registry did not start:\n{log_tail(self.log_path)}")

    def stop(self) -> None:
        """Stop the registry by PID and the token issuer."""
        if self.process is not None:
            stop_process(self.process)
            self.process = None
        if self.issuer is not None:
            self.issuer.stop()
        if self._owns_directory:
            shutil.rmtree(self.directory, ignore_errors=True)

    def _config(self, port: int) -> dict[str, Any]:
        auth: dict[str, Any]
        if self.issuer is None:
            auth = {
                "htpasswd": {"realm": "crabglamp-test", "path": str(self.htpasswd_path)}
            }
        else:
            auth = {
                "token": {
                    "realm": self.issuer.realm,
                    "service": self.issuer.service,
                    "issuer": self.issuer.issuer,
                    "rootcertbundle": str(self.issuer.cert_path),
                }
            }
        return {
            "version": "0.1",
            "log": {"level": "info", "formatter": "text"},
            "storage": {
                "filesystem": {"rootdirectory": str(self.directory / "storage")},
                "delete": {"enabled": True},
                "maintenance": {"uploadpurging": {"enabled": False}},
            },
            "http": {"addr": f"127.0.0.1:{port}", "secret": secrets.token_hex(16)},
            "auth": auth,
        }

    def _write_htpasswd(self) -> None:
        """Replace the htpasswd file atomically with a new mtime."""
        lines = "".join(f"{htpasswd_line(n, p)}\n" for n, p in self.users.items())
        before = (
            self.htpasswd_path.stat().st_mtime_ns if self.htpasswd_path.exists() else 0
        )
        staging = self.htpasswd_path.with_suffix(".new")
        staging.write_text(lines)
        after = max(staging.stat().st_mtime_ns, before + 1_000_000)
        os.utime(staging, ns=(after, after))
        os.replace(staging, self.htpasswd_path)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()


def _wait_for_v2(process: subprocess.Popen[bytes], port: int) -> bool:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline and process.poll() is None:
        try:
            response = httpx.get(f"http://127.0.0.1:{port}/v2/", timeout=1.0)
        except httpx.TransportError:
            time.sleep(0.05)
            continue
        return response.status_code in (200, 401) and process.poll() is None
    return False


_CHALLENGE_PARAM = re.compile(r'(\w+)="([^"]*)"')


def parse_challenge(header: str) -> tuple[str, dict[str, str]]:
    """``WWW-Authenticate`` → (lower-case scheme, parameters)."""
    scheme, _, rest = header.strip().partition(" ")
    return scheme.lower(), dict(_CHALLENGE_PARAM.findall(rest))


class RegistryAuth(httpx.Auth):
    """Answers the registry's 401 challenge as a Docker client does.

    Basic challenges get the credentials; Bearer challenges get a token from
    the realm. With ``push`` the token asks for ``pull,push`` on the repository.
    The last working header is reused until the registry challenges again.
    """

    requires_request_body = True

    def __init__(self, username: str, password: str, *, push: bool = True) -> None:
        self.username = username
        self.password = password
        self.push = push
        self._header: str | None = None

    def auth_flow(
        self, request: httpx.Request
    ) -> Generator[httpx.Request, httpx.Response, None]:
        if self._header is not None:
            request.headers["Authorization"] = self._header
        response = yield request
        if response.status_code != 401:
            return
        scheme, params = parse_challenge(response.headers.get("WWW-Authenticate", ""))
        if scheme == "basic":
            raw = f"{self.username}:{self.password}".encode()
            header = "Basic " + base64.b64encode(raw).decode()
        elif scheme == "bearer" and "realm" in params:
            token = self._token(params)
            if token is None:
                return
            header = f"Bearer {token}"
        else:
            return
        if header == request.headers.get("Authorization"):
            return
        self._header = header
        request.headers["Authorization"] = header
        yield request

    def _token(self, params: Mapping[str, str]) -> str | None:
        query: dict[str, str] = {}
        if "service" in params:
            query["service"] = params["service"]
        scope = params.get("scope")
        if scope and self.push and scope.startswith("repository:"):
            scope = scope.rpartition(":")[0] + ":pull,push"
        if scope:
            query["scope"] = scope
        response = httpx.get(
            params["realm"],
            params=query,
            auth=(self.username, self.password),
            timeout=10.0,
        )
        if response.status_code != 200:
            return None
        body = response.json()
        token = body.get("token") or body.get("access_token")
        return str(token) if token else None


def registry_client(username: str, password: str) -> httpx.Client:
    """An httpx client that authenticates to either registry mode."""
    return httpx.Client(auth=RegistryAuth(username, password), timeout=30.0)


def _expect(response: httpx.Response, status: int) -> None:
    if response.status_code != status:
        raise RuntimeError(
            f"{response.request.method} {response.request.url} answered "
            f"{response.status_code}, expected {status}: {response.text[:500]}"
        )


def push_blob(client: httpx.Client, base_url: str, repo: str, data: bytes) -> str:
    """Upload a blob unless present (monolithic POST + PUT); return its digest."""
    digest = sha256_digest(data)
    if client.head(f"{base_url}/v2/{repo}/blobs/{digest}").status_code == 200:
        return digest
    started = client.post(f"{base_url}/v2/{repo}/blobs/uploads/")
    _expect(started, 202)
    location = urljoin(f"{base_url}/", started.headers["Location"])
    separator = "&" if "?" in location else "?"
    done = client.put(
        f"{location}{separator}digest={digest}",
        content=data,
        headers={"Content-Type": "application/octet-stream"},
    )
    _expect(done, 201)
    return digest


def encode_manifest(manifest: Mapping[str, Any]) -> bytes:
    """The exact bytes pushed for a manifest (its digest is over these)."""
    return json.dumps(manifest, indent=3).encode()


def push_manifest(
    client: httpx.Client,
    base_url: str,
    repo: str,
    ref: str,
    manifest: Mapping[str, Any],
    media_type: str,
) -> str:
    """PUT a manifest under a tag or its digest; return its digest."""
    body = encode_manifest(manifest)
    digest = sha256_digest(body)
    response = client.put(
        f"{base_url}/v2/{repo}/manifests/{ref}",
        content=body,
        headers={"Content-Type": media_type},
    )
    _expect(response, 201)
    answered = response.headers.get("Docker-Content-Digest", digest)
    if answered != digest:
        raise RuntimeError(f"registry stored {answered}, pushed {digest}")
    return digest


def build_layer(files: Mapping[str, bytes]) -> tuple[bytes, str]:
    """Gzipped tar of ``files`` and its diff ID (sha256 of the plain tar)."""
    buffer = io.BytesIO()
    names = {str(PurePosixPath(name.lstrip("/"))): data for name, data in files.items()}
    directories = {
        str(parent)
        for name in names
        for parent in PurePosixPath(name).parents
        if str(parent) != "."
    }
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for directory in sorted(directories):
            info = tarfile.TarInfo(directory)
            info.type, info.mode = tarfile.DIRTYPE, 0o755
            tar.addfile(info)
        for name, data in sorted(names.items()):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            executable = data.startswith(b"#!") or "bin" in PurePosixPath(name).parts
            info.mode = 0o755 if executable else 0o644
            tar.addfile(info, io.BytesIO(data))
    plain = buffer.getvalue()
    return gzip.compress(plain, mtime=0), sha256_digest(plain)


@dataclass(frozen=True)
class _Media:
    index: str
    manifest: str
    config: str
    layer: str


MEDIA = {
    "oci": _Media(OCI_INDEX, OCI_MANIFEST, OCI_CONFIG, OCI_LAYER),
    "docker": _Media(DOCKER_LIST, DOCKER_MANIFEST, DOCKER_CONFIG, DOCKER_LAYER),
}


@dataclass(frozen=True)
class PushedImage:
    """What ``push_image`` stored; platforms are keyed ``os/arch[/variant]``."""

    repo: str
    tag: str
    digest: str
    media_type: str
    platform_digests: dict[str, str] = field(default_factory=dict)
    config_digests: dict[str, str] = field(default_factory=dict)


def image_config(
    os_name: str,
    architecture: str,
    variant: str | None,
    diff_ids: Sequence[str],
    config_extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Image config blob; ``config_extra`` updates ``config`` (None drops a key)."""
    runtime: dict[str, Any] = {
        "Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
        "Entrypoint": ["/bin/sh", "-c"],
        "Cmd": ["echo hello"],
        "WorkingDir": "/",
        "ExposedPorts": {"8080/tcp": {}},
    }
    for key, value in (config_extra or {}).items():
        if value is None:
            runtime.pop(key, None)
        else:
            runtime[key] = value
    config: dict[str, Any] = {"architecture": architecture, "os": os_name}
    if variant:
        config["variant"] = variant
    config.update(
        {
            "created": "2024-01-01T00:00:00Z",
            "config": runtime,
            "rootfs": {"type": "layers", "diff_ids": list(diff_ids)},
            "history": [
                {"created": "2024-01-01T00:00:00Z", "created_by": "crabglamp test"}
            ],
        }
    )
    return config


def _descriptor(media_type: str, data: bytes) -> dict[str, Any]:
    return {"mediaType": media_type, "digest": sha256_digest(data), "size": len(data)}


def push_image(
    registry: LocalRegistry,
    repo: str,
    tag: str,
    *,
    username: str = ADMIN[0],
    password: str = ADMIN[1],
    platforms: Sequence[tuple[str, str, str | None]] = (("linux", "amd64", None),),
    media: Literal["oci", "docker"] = "oci",
    files: Mapping[str, bytes] | None = None,
    config_extra: Mapping[str, Any] | None = None,
    attestation: bool = False,
) -> PushedImage:
    """Build and push a real image; an index when several platforms or an
    attestation (one ``unknown/unknown`` manifest per platform, as buildx does)."""
    kinds = MEDIA[media]
    base = registry.url
    platform_digests: dict[str, str] = {}
    config_digests: dict[str, str] = {}
    entries: list[dict[str, Any]] = []
    single = len(platforms) == 1 and not attestation
    with registry_client(username, password) as client:
        for os_name, architecture, variant in platforms:
            key = "/".join(p for p in (os_name, architecture, variant) if p)
            content = files or {"etc/crabglamp-test": f"{key}\n".encode()}
            layer, diff_id = build_layer(content)
            push_blob(client, base, repo, layer)
            config = json.dumps(
                image_config(os_name, architecture, variant, [diff_id], config_extra)
            ).encode()
            config_digests[key] = push_blob(client, base, repo, config)
            manifest = {
                "schemaVersion": 2,
                "mediaType": kinds.manifest,
                "config": _descriptor(kinds.config, config),
                "layers": [_descriptor(kinds.layer, layer)],
            }
            if single:
                digest = push_manifest(
                    client, base, repo, tag, manifest, kinds.manifest
                )
                platform_digests[key] = digest
                return PushedImage(
                    repo, tag, digest, kinds.manifest, platform_digests, config_digests
                )
            body = encode_manifest(manifest)
            digest = sha256_digest(body)
            push_manifest(client, base, repo, digest, manifest, kinds.manifest)
            platform_digests[key] = digest
            platform = {"architecture": architecture, "os": os_name}
            if variant:
                platform["variant"] = variant
            entries.append({**_descriptor(kinds.manifest, body), "platform": platform})
        if attestation:
            for digest in list(platform_digests.values()):
                entries.append(_push_attestation(client, base, repo, tag, digest))
        index = {"schemaVersion": 2, "mediaType": kinds.index, "manifests": entries}
        digest = push_manifest(client, base, repo, tag, index, kinds.index)
    return PushedImage(repo, tag, digest, kinds.index, platform_digests, config_digests)


def _push_attestation(
    client: httpx.Client, base: str, repo: str, tag: str, subject: str
) -> dict[str, Any]:
    statement = json.dumps(
        {
            "_type": "https://in-toto.io/Statement/v0.1",
            "predicateType": "https://slsa.dev/provenance/v0.2",
            "subject": [
                {
                    "name": f"pkg:docker/{repo}@{tag}",
                    "digest": {"sha256": subject.removeprefix("sha256:")},
                }
            ],
            "predicate": {"builder": {"id": "crabglamp-test"}},
        }
    ).encode()
    push_blob(client, base, repo, statement)
    config = json.dumps(
        {
            "architecture": "unknown",
            "os": "unknown",
            "config": {},
            "rootfs": {"type": "layers", "diff_ids": [sha256_digest(statement)]},
        }
    ).encode()
    push_blob(client, base, repo, config)
    layer = _descriptor(IN_TOTO, statement)
    layer["annotations"] = {
        "in-toto.io/predicate-type": "https://slsa.dev/provenance/v0.2"
    }
    manifest = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": _descriptor(OCI_CONFIG, config),
        "layers": [layer],
    }
    body = encode_manifest(manifest)
    push_manifest(client, base, repo, sha256_digest(body), manifest, OCI_MANIFEST)
    return {
        **_descriptor(OCI_MANIFEST, body),
        "annotations": {
            "vnd.docker.reference.digest": subject,
            "vnd.docker.reference.type": "attestation-manifest",
        },
        "platform": {"architecture": "unknown", "os": "unknown"},
    }
