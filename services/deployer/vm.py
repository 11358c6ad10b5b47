"""App VMs: the image's root file system booted as an amd64 virtual machine.

Each App VM is a QEMU process booting the shared platform kernel and
initramfs (see ``vm_assets``), with the image's root file system as an ext4
disk and a small per-deploy config archive appended to the initramfs. The
platform init runs the image's entrypoint and command in the image's root;
QEMU's user-mode network forwards a loopback port on the host to the App's
port. QEMU uses KVM where the host's KVM can boot a stock kernel, otherwise
TCG emulation.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import math
import os
import posixpath
import re
import shlex
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal, Protocol

import structlog

from contracts.replies import ImageConfig
from services.deployer.vm_assets import (
    PlatformAssets,
    directory,
    newc_archive,
    regular,
)
from services.deployer.vm_errors import (
    AppExitedError,
    BootFailedError,
    BootTimedOutError,
    GuestPanickedError,
    HostPortInUseError,
    InvalidVmHandleError,
    RootfsImageError,
    VmAssetsError,
    VmConfigError,
    VmError,
)

__all__ = [
    "AppExitedError",
    "BootFailedError",
    "BootTimedOutError",
    "GuestPanickedError",
    "HostPortInUseError",
    "InvalidVmHandleError",
    "PlatformAssets",
    "QemuDriver",
    "RootfsImageError",
    "VmAssetsError",
    "VmConfigError",
    "VmDriver",
    "VmError",
    "VmHandle",
    "VmSpec",
    "app_argv",
    "build_config_archive",
    "build_rootfs_image",
    "free_host_port",
]

log = structlog.get_logger(__name__)

QEMU = "qemu-system-x86_64"
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# Quiet and quick under emulation: no crypto self-tests, no probing of the
# keyboard controller's extras, one serial port. A guest runs one App, so the
# kernel's defences between its own processes buy nothing but boot time; the
# VM boundary is what separates Apps.
KERNEL_ARGS = (
    "console=ttyS0",
    "panic=-1",
    "quiet",
    "mitigations=off",
    "cryptomgr.notests",
    "i8042.noaux",
    "i8042.nomux",
    "i8042.nopnp",
    "i8042.dumbkbd",
    "8250.nr_uarts=1",
    "no_timer_check",
)
ACCELS = ("auto", "kvm", "tcg")
ROOTFS_HEADROOM = 32 * 1024 * 1024
_BLOCK = 4096
_UNIX_PATH_MAX = 107
_CONSOLE_TAIL_LINES = 40
_PROBE_TIMEOUT_S = 10.0
_QMP_TIMEOUT_S = 10.0
_MARKER = "crabglamp:"


@dataclass(frozen=True, kw_only=True)
class VmSpec:
    """What to boot: one deploy's disk, image config and ports."""

    deploy_id: str
    rootfs_image: Path
    config: ImageConfig
    guest_port: int
    host_port: int
    work_dir: Path
    memory_mb: int = 128
    cpus: int = 1


@dataclass
class VmHandle:
    """A started App VM, enough to find and stop it after a restart."""

    deploy_id: str
    pid: int
    host_port: int
    qmp_socket: Path
    console_log: Path
    work_dir: Path
    started_at: float

    def to_json(self) -> str:
        fields = {
            key: str(value) if isinstance(value, Path) else value
            for key, value in asdict(self).items()
        }
        return json.dumps(fields)

    @classmethod
    def from_json(cls, text: str) -> VmHandle:
        try:
            fields = json.loads(text)
            return cls(
                deploy_id=str(fields["deploy_id"]),
                pid=int(fields["pid"]),
                host_port=int(fields["host_port"]),
                qmp_socket=Path(fields["qmp_socket"]),
                console_log=Path(fields["console_log"]),
                work_dir=Path(fields["work_dir"]),
                started_at=float(fields["started_at"]),
            )
        except (ValueError, KeyError, TypeError) as error:
            raise InvalidVmHandleError(f"not a VM handle: {error}") from error


class VmDriver(Protocol):
    """Boots, watches and stops App VMs."""

    async def start(self, spec: VmSpec) -> VmHandle: ...

    async def wait_ready(self, handle: VmHandle, timeout_s: float) -> float: ...

    async def stop(self, handle: VmHandle, timeout_s: float = 10.0) -> None: ...

    def running(self, handle: VmHandle) -> bool: ...


def free_host_port() -> int:
    """A loopback TCP port that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def app_argv(config: ImageConfig) -> list[str]:
    """The image's command line: entrypoint followed by cmd, as Docker runs it."""
    argv = [*(config.entrypoint or []), *(config.cmd or [])]
    if not argv:
        raise VmConfigError("the image names no entrypoint and no cmd to run")
    return argv


def app_env(config: ImageConfig) -> list[str]:
    """The image's env with Docker's defaults for PATH and HOME."""
    merged: dict[str, str] = {"PATH": DEFAULT_PATH, "HOME": "/root"}
    for entry in config.env:
        name, equals, value = entry.partition("=")
        if equals and name and not name.startswith("-"):
            merged[name] = value
    return [f"{name}={value}" for name, value in merged.items()]


def app_workdir(config: ImageConfig) -> str:
    return posixpath.normpath("/" + (config.working_dir or "").lstrip("/"))


def build_config_archive(config: ImageConfig, port: int, dest: Path) -> Path:
    """Write the per-deploy cpio that the platform init reads its orders from."""
    if not 0 < port < 65536:
        raise VmConfigError(f"the App's port {port} is not a TCP port")
    lines = [
        f"PORT={port}",
        f"WORKDIR={shlex.quote(app_workdir(config))}",
        f"APP_ARGV={shlex.quote(shlex.join(app_argv(config)))}",
        f"APP_ENV={shlex.quote(shlex.join(app_env(config)))}",
    ]
    archive = newc_archive(
        [
            directory("crabglamp"),
            regular("crabglamp/config.sh", "\n".join(lines).encode() + b"\n", 0o600),
        ]
    )
    _write_private(dest, archive)
    return dest


def build_rootfs_image(rootfs_dir: Path, dest: Path) -> Path:
    """Turn a root file system tree into an ext4 disk image, without root."""
    used, inodes = _tree_usage(rootfs_dir)
    size_kib = math.ceil((used * 1.3 + ROOTFS_HEADROOM) / 1024)
    temporary = dest.with_name(f".{dest.name}.{os.getpid()}.tmp")
    temporary.unlink(missing_ok=True)
    command = [
        "mke2fs",
        "-q",
        "-t",
        "ext4",
        "-d",
        str(rootfs_dir),
        "-L",
        "root",
        "-m",
        "0",
        "-N",
        str(math.ceil(inodes * 1.3) + 1024),
        str(temporary),
        f"{size_kib}k",
    ]
    try:
        done = subprocess.run(command, capture_output=True, text=True)
    except OSError as error:
        raise RootfsImageError(f"cannot run mke2fs (e2fsprogs): {error}") from error
    if done.returncode != 0:
        temporary.unlink(missing_ok=True)
        raise RootfsImageError(f"mke2fs failed: {done.stderr.strip()}")
    os.replace(temporary, dest)
    return dest


def _tree_usage(root: Path) -> tuple[int, int]:
    """Bytes of 4 KiB blocks and the number of inodes a tree needs."""
    used, inodes = _BLOCK, 1
    seen: set[tuple[int, int]] = set()
    pending = [root]
    while pending:
        with os.scandir(pending.pop()) as entries:
            for entry in entries:
                info = entry.stat(follow_symlinks=False)
                if info.st_nlink > 1 and not entry.is_dir(follow_symlinks=False):
                    if (info.st_dev, info.st_ino) in seen:
                        continue
                    seen.add((info.st_dev, info.st_ino))
                inodes += 1
                if entry.is_dir(follow_symlinks=False):
                    used += _BLOCK
                    pending.append(Path(entry.path))
                elif entry.is_file(follow_symlinks=False):
                    used += math.ceil(info.st_size / _BLOCK) * _BLOCK
                elif entry.is_symlink() and info.st_size >= 60:
                    used += _BLOCK
                used += 64  # its entry in the parent directory
    return used, inodes


def _write_private(path: Path, data: bytes) -> None:
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "wb") as file:
        file.write(data)


Probe = Literal["answered", "open", "closed"]


async def _probe(port: int, timeout_s: float) -> Probe:
    """Ask the forwarded port; only the guest can send bytes back."""
    try:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection("127.0.0.1", port), timeout_s
        )
    except (OSError, TimeoutError):
        return "closed"
    try:
        writer.write(b"GET / HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
        await writer.drain()
        data = await asyncio.wait_for(reader.read(1), timeout_s)
        return "answered" if data else "closed"
    except TimeoutError:
        return "open"
    except OSError:
        return "closed"
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


def _pid_alive(pid: int) -> bool:
    """Whether ``pid`` exists and is not a zombie."""
    try:
        status = (Path("/proc") / str(pid) / "stat").read_text()
    except OSError:
        return False
    return status.rpartition(")")[2].split()[:1] != ["Z"]


def _pid_runs_vm(pid: int, work_dir: Path) -> bool:
    """Whether ``pid`` is a live process whose command line names ``work_dir``."""
    proc = Path("/proc") / str(pid)
    try:
        status = (proc / "stat").read_text()
        arguments = (proc / "cmdline").read_bytes().split(b"\x00")
    except OSError:
        return False
    if status.rpartition(")")[2].split()[:1] == ["Z"]:
        return False
    marker = os.fsencode(work_dir) + b"/"
    return any(marker in argument for argument in arguments)


def _tail(path: Path, lines: int = _CONSOLE_TAIL_LINES) -> str:
    try:
        with path.open("rb") as file:
            file.seek(0, os.SEEK_END)
            file.seek(max(0, file.tell() - 16384))
            text = file.read().decode(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.replace("\r", "").splitlines()[-lines:])


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return "unknown"


_ACCEL_CACHE: dict[Path, str] = {}


class QemuDriver:
    """Runs each App VM as a QEMU process: KVM where it works, else TCG."""

    def __init__(
        self, assets: PlatformAssets, *, accel: str = "auto", qemu: str = QEMU
    ) -> None:
        if accel not in ACCELS:
            raise VmConfigError(f"accel must be one of {ACCELS}, not {accel!r}")
        self._assets = assets
        self._accel = accel
        self._qemu = qemu
        self._processes: dict[int, asyncio.subprocess.Process] = {}
        self._probe_lock = asyncio.Lock()

    async def accel(self) -> str:
        """``kvm`` or ``tcg``: probed once per host boot when set to auto."""
        if self._accel != "auto":
            return self._accel
        async with self._probe_lock:
            cached = _ACCEL_CACHE.get(self._assets.root)
            if cached is None:
                cached = await self._cached_probe()
                _ACCEL_CACHE[self._assets.root] = cached
        return cached

    async def start(self, spec: VmSpec) -> VmHandle:
        """Launch QEMU for ``spec``; returns once QEMU answers on QMP.

        The handle is also written to ``vm.json`` in the work dir.
        """
        accel = await self.accel()
        try:
            qmp_socket, initramfs = await asyncio.to_thread(self._prepare, spec)
        except OSError as error:
            raise BootFailedError(f"cannot prepare {spec.work_dir}: {error}") from error
        console_log = spec.work_dir / "console.log"
        command = self._command(spec, accel, qmp_socket, console_log, initramfs)
        log.debug("vm command", deploy_id=spec.deploy_id, command=shlex.join(command))

        # A session of its own: the VM outlives a restart of this process
        output = await asyncio.to_thread(
            os.open, spec.work_dir / "qemu.log", os.O_WRONLY | os.O_CREAT | os.O_TRUNC
        )
        try:
            process = await asyncio.create_subprocess_exec(
                *command,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=output,
                stderr=output,
                env={**os.environ, "TMPDIR": str(spec.work_dir)},
                start_new_session=True,
            )
        except OSError as error:
            raise BootFailedError(f"cannot run {self._qemu}: {error}") from error
        finally:
            os.close(output)
        handle = VmHandle(
            deploy_id=spec.deploy_id,
            pid=process.pid,
            host_port=spec.host_port,
            qmp_socket=qmp_socket,
            console_log=console_log,
            work_dir=spec.work_dir,
            started_at=time.time(),
        )
        self._processes[process.pid] = process
        await asyncio.to_thread(
            (spec.work_dir / "vm.json").write_text, handle.to_json()
        )

        # QEMU opens its QMP socket once its options are parsed
        try:
            await self._wait_for_qmp(handle)
        except BootFailedError:
            await self.stop(handle)
            raise
        log.info(
            "vm started",
            deploy_id=spec.deploy_id,
            pid=process.pid,
            host_port=spec.host_port,
            accel=accel,
        )
        return handle

    async def wait_ready(self, handle: VmHandle, timeout_s: float) -> float:
        """Seconds from start until the App's port answers through the forward."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while True:
            if not self.running(handle):
                raise await self._exit_error(handle)
            outcome = await _probe(handle.host_port, 0.5)
            if outcome == "answered" or (
                outcome == "open" and self._console_says(handle, "listening on")
            ):
                elapsed = time.time() - handle.started_at
                log.info("vm ready", deploy_id=handle.deploy_id, seconds=elapsed)
                return elapsed
            if loop.time() >= deadline:
                raise BootTimedOutError(
                    f"the App VM's port did not answer within {timeout_s:.0f} s",
                    _tail(handle.console_log),
                )
            await asyncio.sleep(0.05)

    async def stop(self, handle: VmHandle, timeout_s: float = 10.0) -> None:
        """Power the VM off, politely first; a hung guest is killed."""
        how = "already stopped"
        if self.running(handle):
            how = await self._stop_running(handle, timeout_s)
        self._processes.pop(handle.pid, None)
        await asyncio.to_thread(self._clean, handle)
        log.info("vm stopped", deploy_id=handle.deploy_id, pid=handle.pid, how=how)

    def running(self, handle: VmHandle) -> bool:
        process = self._processes.get(handle.pid)
        if process is not None:
            # Our own child: its exit status is the truth. Its command line in
            # /proc can briefly lag behind the spawn, so it is not consulted.
            return process.returncode is None and _pid_alive(handle.pid)
        return _pid_runs_vm(handle.pid, handle.work_dir)

    async def _stop_running(self, handle: VmHandle, timeout_s: float) -> str:
        if await self._qmp(handle, "system_powerdown") and await self._exited(
            handle, timeout_s
        ):
            return "powered off"
        log.warning("vm ignored the power button", deploy_id=handle.deploy_id)
        if await self._qmp(handle, "quit") and await self._exited(handle, 2.0):
            return "quit"
        # A guest stuck under TCG can stop answering QMP at all
        if self.running(handle):
            with contextlib.suppress(ProcessLookupError):
                os.kill(handle.pid, signal.SIGKILL)
        await self._exited(handle, 5.0)
        return "killed"

    async def _exited(self, handle: VmHandle, timeout_s: float) -> bool:
        process = self._processes.get(handle.pid)
        if process is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(process.wait(), timeout_s)
            return process.returncode is not None
        deadline = asyncio.get_running_loop().time() + timeout_s
        while self.running(handle):
            if asyncio.get_running_loop().time() >= deadline:
                return False
            await asyncio.sleep(0.05)
        return True

    async def _qmp(self, handle: VmHandle, command: str) -> bool:
        """Send one QMP command; False when QEMU did not take it."""
        try:
            async with asyncio.timeout(2.0):
                reader, writer = await asyncio.open_unix_connection(handle.qmp_socket)
                try:
                    await reader.readline()
                    for execute in ("qmp_capabilities", command):
                        writer.write(json.dumps({"execute": execute}).encode() + b"\n")
                        await writer.drain()
                        while b'"event"' in (line := await reader.readline()):
                            pass
                        if b'"return"' not in line:
                            return False
                finally:
                    writer.close()
        except (OSError, TimeoutError) as error:
            log.warning("vm qmp failed", deploy_id=handle.deploy_id, error=str(error))
            return False
        return True

    async def _wait_for_qmp(self, handle: VmHandle) -> None:
        deadline = asyncio.get_running_loop().time() + _QMP_TIMEOUT_S
        while not await asyncio.to_thread(handle.qmp_socket.exists):
            if not self.running(handle):
                raise await self._exit_error(handle)
            if asyncio.get_running_loop().time() >= deadline:
                raise BootFailedError(
                    f"QEMU opened no QMP socket within {_QMP_TIMEOUT_S:.0f} s",
                    _tail(handle.work_dir / "qemu.log"),
                )
            await asyncio.sleep(0.02)

    async def _exit_error(self, handle: VmHandle) -> BootFailedError:
        """Why the VM is gone, read from QEMU's exit status and the console."""
        code: int | None = None
        process = self._processes.get(handle.pid)
        if process is not None:
            with contextlib.suppress(TimeoutError):
                code = await asyncio.wait_for(process.wait(), 2.0)
        console = await asyncio.to_thread(_tail, handle.console_log, 400)
        qemu_log = await asyncio.to_thread(_tail, handle.work_dir / "qemu.log")
        tail = "\n".join(console.splitlines()[-_CONSOLE_TAIL_LINES:])
        exited = re.findall(r"crabglamp: app exited (\d+)", console)
        failed = re.findall(r"crabglamp: boot failed: (.*)", console)
        # pvpanic makes QEMU exit 1 on a guest panic, without a word of its own
        if "Kernel panic" in console or (code == 1 and not qemu_log and console):
            return GuestPanickedError("the App VM's kernel panicked", tail)
        if exited:
            return AppExitedError(
                f"the App exited with code {exited[-1]} before its port answered",
                tail,
                int(exited[-1]),
            )
        if failed:
            return BootFailedError(f"the App VM failed to boot: {failed[-1]}", tail)
        if "host forwarding" in qemu_log:
            return HostPortInUseError(
                f"QEMU cannot listen on 127.0.0.1:{handle.host_port}: {qemu_log}", tail
            )
        status = "an unknown status" if code is None else f"code {code}"
        return BootFailedError(
            f"QEMU exited with {status}: {qemu_log or 'no message'}", tail
        )

    def _console_says(self, handle: VmHandle, words: str) -> bool:
        return f"{_MARKER} {words}" in _tail(handle.console_log)

    def _prepare(self, spec: VmSpec) -> tuple[Path, Path]:
        """Lay out the work dir: the initramfs with this deploy's config."""
        spec.work_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        config = build_config_archive(
            spec.config, spec.guest_port, spec.work_dir / "config.cpio"
        )
        initramfs = spec.work_dir / "initramfs.cpio"
        platform = self._assets.initramfs.read_bytes()
        platform += b"\x00" * (-len(platform) % 4)
        _write_private(initramfs, platform + config.read_bytes())
        config.unlink()
        qmp_socket = spec.work_dir / "qmp.sock"
        if len(os.fsencode(qmp_socket)) > _UNIX_PATH_MAX:
            digest = hashlib.sha256(os.fsencode(spec.work_dir.resolve())).hexdigest()
            qmp_socket = Path(tempfile.gettempdir()) / f"crabglamp-{digest[:24]}.qmp"
        qmp_socket.unlink(missing_ok=True)
        (spec.work_dir / "console.log").unlink(missing_ok=True)
        return qmp_socket, initramfs

    def _clean(self, handle: VmHandle) -> None:
        # The initramfs holds the App's env, which may hold secrets
        for leftover in (handle.qmp_socket, handle.work_dir / "initramfs.cpio"):
            leftover.unlink(missing_ok=True)

    def _command(
        self,
        spec: VmSpec,
        accel: str,
        qmp_socket: Path,
        console_log: Path,
        initramfs: Path,
    ) -> list[str]:
        # TODO: the console log grows with everything the App prints; it needs
        # rotation, or a pipe into the log store, before Apps run for weeks.
        forward = f"tcp:127.0.0.1:{spec.host_port}-:{spec.guest_port}"
        disk = f"file={spec.rootfs_image},if=none,id=root,format=raw,snapshot=on"
        return [
            *self._base_command(accel, spec.memory_mb, console_log),
            "-name",
            f"crabglamp-{spec.deploy_id}",
            "-smp",
            str(spec.cpus),
            "-initrd",
            str(initramfs),
            "-append",
            " ".join(KERNEL_ARGS),
            "-qmp",
            f"unix:{qmp_socket},server=on,wait=off",
            "-netdev",
            f"user,id=n0,hostfwd={forward}",
            "-device",
            "virtio-net-pci,netdev=n0,romfile=",
            "-drive",
            disk,
            "-device",
            "virtio-blk-pci,drive=root",
        ]

    def _base_command(self, accel: str, memory_mb: int, console_log: Path) -> list[str]:
        cpu = "host" if accel == "kvm" else "max"
        return [
            self._qemu,
            "-M",
            "q35",
            "-accel",
            accel,
            "-cpu",
            cpu,
            "-m",
            str(memory_mb),
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
            "-no-reboot",
            "-serial",
            f"file:{console_log}",
            "-device",
            "pvpanic",
            "-action",
            "panic=exit-failure",
            "-kernel",
            str(self._assets.kernel),
        ]

    async def _cached_probe(self) -> str:
        cache = self._assets.root / "accel.json"
        boot_id = _boot_id()
        with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
            recorded = json.loads(await asyncio.to_thread(cache.read_text))
            if recorded["boot_id"] == boot_id and recorded["accel"] in ("kvm", "tcg"):
                return str(recorded["accel"])
        accel = "kvm" if await self._kvm_boots() else "tcg"
        log.info("vm accelerator chosen", accel=accel)
        record = json.dumps({"boot_id": boot_id, "accel": accel})
        with contextlib.suppress(OSError):
            await asyncio.to_thread(cache.write_text, record)
        return accel

    async def _kvm_boots(self) -> bool:
        """Whether a stock kernel boots under KVM here; some nested KVMs fail."""
        if not os.access("/dev/kvm", os.R_OK | os.W_OK):
            return False
        work = Path(
            await asyncio.to_thread(
                tempfile.mkdtemp, prefix=".tmp-probe-", dir=self._assets.root
            )
        )
        console_log = work / "console.log"
        command = [
            *self._base_command("kvm", 128, console_log),
            "-initrd",
            str(self._assets.initramfs),
            "-append",
            " ".join((*KERNEL_ARGS, "crabglamp.probe")),
        ]
        try:
            process = await asyncio.create_subprocess_exec(
                *command,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.DEVNULL,
            )
        except OSError:
            return False
        try:
            deadline = asyncio.get_running_loop().time() + _PROBE_TIMEOUT_S
            while asyncio.get_running_loop().time() < deadline:
                if f"{_MARKER} probe ok" in _tail(console_log):
                    return True
                if process.returncode is not None:
                    return False
                await asyncio.sleep(0.05)
            return False
        finally:
            if process.returncode is None:
                process.kill()
            await process.wait()
            await asyncio.to_thread(_remove_tree, work)


def _remove_tree(path: Path) -> None:
    for child in path.iterdir():
        child.unlink()
    path.rmdir()
