"""The platform every App VM boots: Debian's kernel and a shared initramfs.

The kernel comes from Debian's ``linux-image-amd64`` package, downloaded and
unpacked without installing it on the host. Its uncompressed ``vmlinux`` is
booted through the PVH entry, which skips the in-guest decompression. The
initramfs holds a static busybox, the driver modules the kernel lacks and the
init script; each deploy appends its own small config archive to it.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import gzip
import hashlib
import json
import lzma
import os
import re
import shutil
import stat
import struct
import subprocess
import tempfile
from collections.abc import AsyncIterator, Iterable, Iterator
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import structlog

from services.deployer.vm_errors import VmAssetsError

log = structlog.get_logger(__name__)

KERNEL_METAPACKAGE = "linux-image-amd64"
BUSYBOX = Path("/bin/busybox")
# Loaded in this order, each after the modules it depends on; pvpanic first,
# so that even a panic while loading the others is reported as one.
WANTED_MODULES = (
    "pvpanic_mmio",
    "button",
    "evdev",
    "virtio_pci",
    "virtio_net",
    "virtio_blk",
    "crc32c_generic",
    "ext4",
)
# Bumped whenever the layout of the initramfs changes.
INITRAMFS_FORMAT = 1

_XZ_MAGIC = b"\xfd7zXZ\x00"
_ELF_MAGIC = b"\x7fELF"
_PT_INTERP = 3
_PT_NOTE = 4
_XEN_ELFNOTE_PHYS32_ENTRY = 18
_MODULE_SUFFIXES = (".ko", ".ko.xz", ".ko.gz")


@dataclass(frozen=True)
class CpioEntry:
    """One member of a newc cpio archive."""

    name: str
    mode: int
    data: bytes = b""
    rdev: tuple[int, int] = (0, 0)


def newc_archive(entries: Iterable[CpioEntry]) -> bytes:
    """A newc cpio archive of ``entries``, its length a multiple of 4."""
    chunks: list[bytes] = []
    for ino, entry in enumerate([*entries, CpioEntry("TRAILER!!!", 0)], start=1):
        name = entry.name.encode() + b"\x00"
        fields = (
            ino if entry.name != "TRAILER!!!" else 0,
            entry.mode,
            0,
            0,
            2 if stat.S_ISDIR(entry.mode) else 1,
            0,
            len(entry.data),
            0,
            0,
            entry.rdev[0],
            entry.rdev[1],
            len(name),
            0,
        )
        header = b"070701" + b"".join(b"%08X" % value for value in fields)
        chunks += [header, name, _pad(len(header) + len(name))]
        chunks += [entry.data, _pad(len(entry.data))]
    return b"".join(chunks)


def _pad(length: int) -> bytes:
    return b"\x00" * (-length % 4)


def directory(name: str) -> CpioEntry:
    return CpioEntry(name, stat.S_IFDIR | 0o755)


def regular(name: str, data: bytes, mode: int = 0o644) -> CpioEntry:
    return CpioEntry(name, stat.S_IFREG | mode, data)


@dataclass(frozen=True)
class PlatformAssets:
    """Kernel and initramfs shared by every App VM, cached under a data dir."""

    root: Path
    kernel: Path
    initramfs: Path
    kernel_is_pvh: bool
    kernel_version: str

    @classmethod
    async def ensure(cls, data_dir: Path) -> PlatformAssets:
        """Fetch and build what is missing; safe to call from many processes."""
        root = data_dir / "platform"
        async with _locked(root):
            return await asyncio.to_thread(cls._load_or_build, root)

    @classmethod
    def _load_or_build(cls, root: Path) -> PlatformAssets:
        try:
            return cls._load(root) or cls._build(root)
        except OSError as error:
            raise VmAssetsError(f"cannot build the VM platform: {error}") from error

    @classmethod
    def _load(cls, root: Path) -> PlatformAssets | None:
        try:
            recorded = json.loads((root / "assets.json").read_text())
            assets = cls(
                root=root,
                kernel=root / recorded["kernel"],
                initramfs=root / recorded["initramfs"],
                kernel_is_pvh=bool(recorded["kernel_is_pvh"]),
                kernel_version=str(recorded["kernel_version"]),
            )
        except (OSError, ValueError, KeyError, TypeError):
            return None
        kernel_dir = root / "kernel" / assets.kernel_version
        fingerprint = _initramfs_fingerprint(kernel_dir)
        current = assets.initramfs.name == f"initramfs-{fingerprint}.cpio"
        if current and assets.kernel.is_file() and assets.initramfs.is_file():
            return assets
        return None

    @classmethod
    def _build(cls, root: Path) -> PlatformAssets:
        for leftover in root.glob(".tmp-*"):
            shutil.rmtree(leftover, ignore_errors=True)
        kernel_dir = _ensure_kernel(root)
        kernel_is_pvh = (kernel_dir / "vmlinux").is_file()
        kernel = kernel_dir / ("vmlinux" if kernel_is_pvh else "vmlinuz")
        initramfs = _ensure_initramfs(root, kernel_dir)
        assets = cls(root, kernel, initramfs, kernel_is_pvh, kernel_dir.name)
        record = {
            "kernel": str(kernel.relative_to(root)),
            "initramfs": initramfs.name,
            "kernel_is_pvh": kernel_is_pvh,
            "kernel_version": kernel_dir.name,
        }
        _write_atomically(root / "assets.json", json.dumps(record, indent=2).encode())
        _remove_stale_initramfs(root, keep=initramfs)
        log.info("vm platform ready", kernel=str(kernel), pvh=kernel_is_pvh)
        return assets


@contextlib.asynccontextmanager
async def _locked(root: Path) -> AsyncIterator[None]:
    """Hold the platform dir's lock file, which excludes other processes too."""
    descriptor = await asyncio.to_thread(_open_lock, root)
    try:
        await asyncio.to_thread(fcntl.flock, descriptor, fcntl.LOCK_EX)
        yield
    finally:
        os.close(descriptor)


def _open_lock(root: Path) -> int:
    root.mkdir(parents=True, exist_ok=True)
    return os.open(root / ".lock", os.O_RDWR | os.O_CREAT, 0o644)


def _ensure_kernel(root: Path) -> Path:
    """The unpacked kernel's directory: vmlinuz, maybe vmlinux, modules."""
    # TODO: a kernel once unpacked is kept for good; picking up Debian's
    # security updates needs a refresh that compares the package version.
    present = sorted((root / "kernel").glob("*/vmlinuz"))
    if present:
        return present[-1].parent
    package = _kernel_package()
    work = Path(tempfile.mkdtemp(prefix=".tmp-", dir=root))
    try:
        # apt's download sandbox user must be able to read this dir
        work.chmod(0o755)
        _run("apt-get", "download", package, cwd=work)
        debs = sorted(work.glob("*.deb"))
        if not debs:
            raise VmAssetsError(f"apt-get download {package} fetched no .deb")
        _run("dpkg-deb", "-x", str(debs[0]), str(work / "pkg"))
        staged = _stage_kernel(work / "pkg", work / "out")
        destination = root / "kernel" / staged.name
        destination.parent.mkdir(exist_ok=True)
        os.replace(staged, destination)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    log.info("vm kernel unpacked", package=package, path=str(destination))
    return destination


def _kernel_package() -> str:
    """The real image package the ``linux-image-amd64`` metapackage names."""
    output = _run("apt-cache", "depends", KERNEL_METAPACKAGE)
    for line in output.splitlines():
        found = re.match(r"\s*Depends:\s*<?(linux-image-[^\s>]+)>?\s*$", line)
        if found and found.group(1) != KERNEL_METAPACKAGE:
            return found.group(1)
    raise VmAssetsError(
        f"apt-cache names no kernel package for {KERNEL_METAPACKAGE}; "
        "is Debian's main archive in the apt sources?"
    )


def _run(*args: str, cwd: Path | None = None) -> str:
    try:
        done = subprocess.run(
            args, cwd=cwd, stdin=subprocess.DEVNULL, capture_output=True, text=True
        )
    except OSError as error:
        raise VmAssetsError(f"cannot run {args[0]}: {error}") from error
    if done.returncode != 0:
        raise VmAssetsError(f"{' '.join(args)} failed: {done.stderr.strip()}")
    return done.stdout


def _stage_kernel(package: Path, out: Path) -> Path:
    """Lay out vmlinuz, vmlinux and the wanted modules of an unpacked package."""
    kernels = sorted((package / "boot").glob("vmlinuz-*"))
    if not kernels:
        raise VmAssetsError("the kernel package holds no /boot/vmlinuz-*")
    version = kernels[0].name.removeprefix("vmlinuz-")
    staged = out / version
    (staged / "modules").mkdir(parents=True)
    bzimage = kernels[0].read_bytes()
    (staged / "vmlinuz").write_bytes(bzimage)
    vmlinux = extract_vmlinux(bzimage)
    if vmlinux is not None and elf_has_pvh_entry(vmlinux):
        (staged / "vmlinux").write_bytes(vmlinux)
    else:
        log.warning("no PVH vmlinux in the kernel: booting the bzImage")
    modules_dir = _modules_dir(package, version)
    order = resolve_modules(_module_index(modules_dir), WANTED_MODULES)
    for name, source in order:
        (staged / "modules" / f"{name}.ko").write_bytes(_module_bytes(source))
    (staged / "modules.order").write_text("".join(f"{n}\n" for n, _ in order))
    return staged


def _modules_dir(package: Path, version: str) -> Path:
    for prefix in ("lib", "usr/lib"):
        candidate = package / prefix / "modules" / version
        if candidate.is_dir():
            return candidate
    raise VmAssetsError(f"the kernel package holds no modules for {version}")


def extract_vmlinux(bzimage: bytes) -> bytes | None:
    """The ELF kernel inside a bzImage's xz stream, or None."""
    start = bzimage.find(_XZ_MAGIC)
    while start != -1:
        decompressor = lzma.LZMADecompressor(format=lzma.FORMAT_XZ)
        try:
            payload = decompressor.decompress(bzimage[start:])
        except lzma.LZMAError:
            payload = b""
        if payload.startswith(_ELF_MAGIC):
            return payload
        start = bzimage.find(_XZ_MAGIC, start + 1)
    return None


def _program_headers(elf: bytes) -> Iterator[tuple[int, int, int]]:
    """(type, file offset, file size) of each program header of an ELF64."""
    if not elf.startswith(_ELF_MAGIC) or elf[4] != 2 or elf[5] != 1:
        return
    (phoff,) = struct.unpack_from("<Q", elf, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", elf, 0x36)
    for index in range(phnum):
        kind, _, offset, _, _, size = struct.unpack_from(
            "<IIQQQQ", elf, phoff + index * phentsize
        )
        yield kind, offset, size


def elf_has_pvh_entry(elf: bytes) -> bool:
    """Whether an ELF64 kernel carries the Xen PVH 32-bit entry note."""
    for kind, offset, size in _program_headers(elf):
        if kind != _PT_NOTE:
            continue
        cursor, end = offset, offset + size
        while cursor + 12 <= end:
            namesz, descsz, note_type = struct.unpack_from("<III", elf, cursor)
            name = elf[cursor + 12 : cursor + 12 + namesz].rstrip(b"\x00")
            if name == b"Xen" and note_type == _XEN_ELFNOTE_PHYS32_ENTRY:
                return True
            cursor += 12 + (namesz + 3) // 4 * 4 + (descsz + 3) // 4 * 4
    return False


def _module_index(modules_dir: Path) -> dict[str, Path]:
    index: dict[str, Path] = {}
    for path in sorted((modules_dir / "kernel").rglob("*.ko*")):
        for suffix in _MODULE_SUFFIXES:
            if path.name.endswith(suffix):
                index[path.name.removesuffix(suffix).replace("-", "_")] = path
    return index


def _module_bytes(path: Path) -> bytes:
    data = path.read_bytes()
    if path.name.endswith(".xz"):
        return lzma.decompress(data)
    if path.name.endswith(".gz"):
        return gzip.decompress(data)
    return data


def module_dependencies(module: bytes) -> list[str]:
    """The names in a module's ``depends=`` modinfo entry."""
    found = re.search(rb"\x00depends=([^\x00]*)\x00", module)
    if not found or not found.group(1):
        return []
    return [name.replace("-", "_") for name in found.group(1).decode().split(",")]


def resolve_modules(
    index: dict[str, Path], wanted: Iterable[str]
) -> list[tuple[str, Path]]:
    """``wanted`` and their dependencies, each after what it depends on."""
    order: list[tuple[str, Path]] = []
    done: set[str] = set()

    def visit(name: str, chain: tuple[str, ...]) -> None:
        if name in done:
            return
        if name in chain:
            raise VmAssetsError(f"module dependency cycle: {' -> '.join(chain)}")
        if name not in index:
            raise VmAssetsError(f"the kernel package has no module {name}")
        for dependency in module_dependencies(_module_bytes(index[name])):
            visit(dependency, (*chain, name))
        done.add(name)
        order.append((name, index[name]))

    for name in wanted:
        visit(name, ())
    return order


def _busybox() -> bytes:
    try:
        binary = BUSYBOX.read_bytes()
    except OSError as error:
        raise VmAssetsError(
            f"cannot read {BUSYBOX}: install the busybox-static package"
        ) from error
    if any(kind == _PT_INTERP for kind, _, _ in _program_headers(binary)):
        raise VmAssetsError(
            f"{BUSYBOX} is dynamically linked: install busybox-static instead"
        )
    return binary


def _busybox_applets() -> list[str]:
    try:
        listed = subprocess.run(
            [str(BUSYBOX), "--list"], capture_output=True, check=True, text=True
        ).stdout
    except (OSError, subprocess.CalledProcessError) as error:
        raise VmAssetsError(f"cannot list the applets of {BUSYBOX}") from error
    return sorted({name for name in listed.split() if name and "/" not in name})


def _init_script() -> bytes:
    return resources.files("services.deployer").joinpath("vm_init.sh").read_bytes()


def _initramfs_fingerprint(kernel_dir: Path) -> str:
    digest = hashlib.sha256(b"format %d\n" % INITRAMFS_FORMAT)
    digest.update(kernel_dir.name.encode() + b"\n")
    digest.update(_init_script())
    try:
        digest.update(BUSYBOX.read_bytes())
        digest.update((kernel_dir / "modules.order").read_bytes())
    except OSError:
        return "missing"
    return digest.hexdigest()[:16]


def _ensure_initramfs(root: Path, kernel_dir: Path) -> Path:
    destination = root / f"initramfs-{_initramfs_fingerprint(kernel_dir)}.cpio"
    if destination.is_file():
        return destination
    modules = (kernel_dir / "modules.order").read_text().split()
    entries = [
        *(directory(name) for name in ("bin", "dev", "etc", "etc/crabglamp")),
        *(directory(name) for name in ("lib", "lib/modules", "newroot", "proc")),
        *(directory(name) for name in ("sys", "crabglamp")),
        # The kernel opens the console before devtmpfs is mounted
        CpioEntry("dev/console", stat.S_IFCHR | 0o600, rdev=(5, 1)),
        regular("bin/busybox", _busybox(), 0o755),
        *(
            CpioEntry(f"bin/{applet}", stat.S_IFLNK | 0o777, b"busybox")
            for applet in _busybox_applets()
            if applet != "busybox"
        ),
        regular("init", _init_script(), 0o755),
        regular("etc/crabglamp/modules", "".join(f"{m}\n" for m in modules).encode()),
        *(
            regular(
                f"lib/modules/{name}.ko",
                (kernel_dir / "modules" / f"{name}.ko").read_bytes(),
            )
            for name in modules
        ),
    ]
    _write_atomically(destination, newc_archive(entries))
    return destination


def _write_atomically(path: Path, data: bytes) -> None:
    descriptor, temporary = tempfile.mkstemp(prefix=".tmp-", dir=path.parent)
    try:
        with os.fdopen(descriptor, "wb") as file:
            file.write(data)
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise


def _remove_stale_initramfs(root: Path, keep: Path) -> None:
    for old in root.glob("initramfs-*.cpio"):
        if old != keep:
            with contextlib.suppress(OSError):
                old.unlink()
