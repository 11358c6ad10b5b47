"""Apply an image's layers, in order, to a root file system directory.

An image is hostile input. Each layer is read as a stream, entry by entry,
and nothing in it may reach outside the root:

- names that are absolute or have a ``..`` component are refused;
- no symbolic link is ever followed while unpacking: an entry whose path
  passes through one is refused, and every parent is checked without
  following links;
- a symbolic link may point anywhere inside the root; an absolute target is
  allowed because the guest resolves it inside its own root, while a relative
  one that climbs above the root is refused;
- a hard link must name an existing non-directory inside the root;
- device nodes are refused, FIFOs are made;
- setuid and setgid bits on anything but a directory are refused (or, if the
  caller asks, stripped); on a directory setgid only passes on its group;
- decompressed bytes and entries are counted as they stream, across all
  layers, and a layer that passes ``max_bytes`` or ``max_entries`` is stopped
  there, so a gzip bomb costs at most that much.

Whiteouts: ``.wh.<name>`` removes ``<name>`` left by lower layers, and
``.wh..wh..opq`` empties its directory of everything lower layers put there;
neither touches what the same layer writes.

The work is blocking file I/O: call it from a worker thread. On an error the
root holds a partial tree, which the caller discards.
"""

import gzip
import os
import shutil
import stat
import tarfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Literal, NoReturn

import zstandard

from services.deployer.pull import GZIP, UNCOMPRESSED, ZSTD, Layer

GiB = 1024**3
WHITEOUT = ".wh."
OPAQUE = ".wh..wh..opq"
_COPY_CHUNK = 1024 * 1024
_MAX_MTIME = 2**33
_NAME_SHOWN = 200
_SPECIAL_BITS = stat.S_ISUID | stat.S_ISGID


class UnpackError(Exception):
    """Root of the unpack's errors: a layer could not be applied."""

    def __init__(self, layer_digest: str, reason: str) -> None:
        super().__init__(f"{reason} (layer {layer_digest})")
        self.layer_digest = layer_digest
        self.reason = reason


class UnsafeLayerError(UnpackError):
    """A layer entry would escape the root or is not allowed in an App VM."""

    def __init__(self, layer_digest: str, entry_name: str, reason: str) -> None:
        shown = f"The layer entry {entry_name[:_NAME_SHOWN]!r}" if entry_name else ""
        super().__init__(layer_digest, f"{shown or 'The layer'} is refused: {reason}")
        self.entry_name = entry_name


class CorruptLayerError(UnpackError):
    """A layer is not a readable (compressed) tar archive."""


@dataclass
class UnpackStats:
    """What the unpack did, counted across all layers."""

    layers: int = 0
    entries: int = 0
    files: int = 0
    directories: int = 0
    symlinks: int = 0
    hardlinks: int = 0
    fifos: int = 0
    whiteouts: int = 0
    bytes_read: int = 0
    bytes_written: int = 0


def unpack_layers(
    layers: Sequence[Layer],
    root: Path,
    *,
    max_bytes: int = 4 * GiB,
    max_entries: int = 500_000,
    setuid: Literal["refuse", "strip"] = "refuse",
) -> UnpackStats:
    """Apply ``layers`` in order into ``root``; raise ``UnpackError`` if unsafe.

    ``max_bytes`` bounds the decompressed tar bytes and ``max_entries`` the
    entries, both over the whole image.
    """
    root.mkdir(parents=True, exist_ok=True)
    # TODO: the owners (uid, gid) recorded in the layers are not applied: every
    # file belongs to the user running the unpack, and mke2fs -d copies that, so
    # images that run as a non-root user find their files owned by root. Keep
    # the owners in a manifest and set them on the disk image instead of
    # chowning on the host.
    # The root may itself be reached through links; nothing below it is.
    tree = _Tree(root.resolve())
    stats = UnpackStats()
    for layer in layers:
        _LayerApplier(layer, tree, stats, max_bytes, max_entries, setuid).apply()
        stats.layers += 1
    tree.finish()
    return stats


class _TooLargeError(Exception):
    """The decompressed stream passed the byte budget."""


class _CorruptStreamError(Exception):
    """Decompressing or reading the layer failed."""


class _Counted:
    """A read-only stream that counts what passes and stops at a limit."""

    def __init__(self, inner: Any, stats: UnpackStats, limit: int) -> None:
        self._inner = inner
        self._stats = stats
        self._limit = limit

    def read(self, size: int = -1, /) -> bytes:
        try:
            data: bytes = self._inner.read(size)
        except Exception as exc:
            raise _CorruptStreamError(str(exc) or type(exc).__name__) from exc
        self._stats.bytes_read += len(data)
        if self._stats.bytes_read > self._limit:
            raise _TooLargeError
        return data

    def write(self, data: bytes, /) -> int:
        raise OSError("a layer stream is read-only")

    def tell(self) -> int:
        return self._stats.bytes_read

    def seek(self, pos: int, /) -> int:
        raise OSError("a layer stream cannot seek")

    def close(self) -> None:
        """The caller closes the underlying file."""


class _Tree:
    """The root being built: checked paths, and what to finish at the end."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._dirs: set[str] = {""}
        self._dir_modes: dict[str, tuple[int, float | None]] = {}

    def path(self, rel: str) -> Path:
        return self.root / rel if rel else self.root

    def parent(
        self, parts: list[str], *, create: bool, layer: str, name: str
    ) -> str | None:
        """The parent of ``parts`` as a relative path, checked to be real dirs.

        Missing parents are made when ``create``, else None is returned; one
        that is a symbolic link is refused, never followed.
        """
        rel = ""
        for part in parts[:-1]:
            rel = _join(rel, part)
            if rel in self._dirs:
                continue
            try:
                found = os.lstat(self.path(rel))
            except FileNotFoundError:
                if not create:
                    return None
                os.mkdir(self.path(rel), 0o755)
                self.made_dir(rel, 0o755, None)
                continue
            if stat.S_ISLNK(found.st_mode):
                raise UnsafeLayerError(
                    layer, name, f"its path passes through the symbolic link {rel!r}"
                )
            if not stat.S_ISDIR(found.st_mode):
                if not create:
                    return None
                raise UnsafeLayerError(
                    layer, name, f"its parent {rel!r} is not a directory"
                )
            self._dirs.add(rel)
        return rel

    def lstat(self, rel: str) -> os.stat_result | None:
        try:
            return os.lstat(self.path(rel))
        except FileNotFoundError:
            return None

    def clear(self, rel: str, *, keep_dir: bool) -> None:
        """Remove what is at ``rel`` (a directory with all in it) unless kept."""
        found = self.lstat(rel)
        if found is None:
            return
        if stat.S_ISDIR(found.st_mode):
            if keep_dir:
                return
            shutil.rmtree(self.path(rel))
            self.forget(rel)
        else:
            os.unlink(self.path(rel))

    def forget(self, rel: str) -> None:
        """Drop what is known about ``rel`` and below: it is gone."""
        prefix = rel + "/"
        self._dirs = {d for d in self._dirs if d != rel and not d.startswith(prefix)}
        for key in [k for k in self._dir_modes if k == rel or k.startswith(prefix)]:
            del self._dir_modes[key]

    def made_dir(self, rel: str, mode: int, mtime: float | None) -> None:
        self._dirs.add(rel)
        self._dir_modes[rel] = (mode, mtime)

    def finish(self) -> None:
        """Directory modes and times, deepest first, once nothing more is added."""
        for rel in sorted(self._dir_modes, key=lambda r: r.count("/"), reverse=True):
            mode, mtime = self._dir_modes[rel]
            if not self._is_real_dir(rel):
                continue
            path = self.path(rel)
            os.chmod(path, mode)
            if mtime is not None:
                os.utime(path, (mtime, mtime))

    def _is_real_dir(self, rel: str) -> bool:
        """Whether ``rel`` and each of its parents is a directory, not a link."""
        current = ""
        for part in rel.split("/"):
            current = _join(current, part)
            found = self.lstat(current)
            if found is None or not stat.S_ISDIR(found.st_mode):
                return False
        return True


class _LayerApplier:
    """Applies one layer's entries to the tree."""

    def __init__(
        self,
        layer: Layer,
        tree: _Tree,
        stats: UnpackStats,
        max_bytes: int,
        max_entries: int,
        setuid: Literal["refuse", "strip"],
    ) -> None:
        self.layer = layer
        self.digest = layer.digest
        self.tree = tree
        self.stats = stats
        self.max_bytes = max_bytes
        self.max_entries = max_entries
        self.setuid = setuid
        self.written: set[str] = set()

    def apply(self) -> None:
        name = ""
        with self.layer.path.open("rb") as raw:
            counted = _Counted(self._decompressed(raw), self.stats, self.max_bytes)
            try:
                with tarfile.open(fileobj=counted, mode="r|") as tar:
                    while (member := tar.next()) is not None:
                        # tarfile keeps every header it read; a long stream must not.
                        tar.members.clear()  # type: ignore[attr-defined]
                        name = member.name
                        self._count(name)
                        try:
                            self._entry(tar, member)
                        except OSError as exc:
                            raise UnpackError(
                                self.digest,
                                f"Writing the entry {name[:_NAME_SHOWN]!r} failed: "
                                f"{exc.strerror or exc}",
                            ) from exc
            except _TooLargeError:
                raise UnsafeLayerError(
                    self.digest,
                    name,
                    f"the image unpacks to more than {self.max_bytes} bytes",
                ) from None
            except _CorruptStreamError as exc:
                raise CorruptLayerError(
                    self.digest, f"The layer cannot be decompressed: {exc}"
                ) from exc
            except tarfile.TarError as exc:
                raise CorruptLayerError(
                    self.digest, f"The layer is not a readable tar archive: {exc}"
                ) from exc

    def _decompressed(self, raw: IO[bytes]) -> Any:
        compression = self.layer.compression
        if compression == GZIP:
            return gzip.GzipFile(fileobj=raw, mode="rb")
        if compression == ZSTD:
            return zstandard.ZstdDecompressor().stream_reader(raw)
        assert compression == UNCOMPRESSED
        return raw

    def _count(self, name: str) -> None:
        self.stats.entries += 1
        if self.stats.entries > self.max_entries:
            raise UnsafeLayerError(
                self.digest, name, f"the image has more than {self.max_entries} entries"
            )

    def _entry(self, tar: tarfile.TarFile, member: tarfile.TarInfo) -> None:
        name = member.name
        parts = self._parts(name, name)
        if not parts:
            if not member.isdir():
                self._refuse(name, "it names the root itself")
            return
        if parts[-1].startswith(WHITEOUT):
            self._whiteout(name, parts)
            return
        if member.ischr() or member.isblk():
            self._refuse(name, "device nodes are not allowed")
        kinds = (member.isdir, member.isreg, member.issym, member.islnk, member.isfifo)
        if not any(kind() for kind in kinds):
            self._refuse(name, f"entries of type {member.type!r} are not supported")
        mode = self._mode(name, member)
        parent = self.tree.parent(parts, create=True, layer=self.digest, name=name)
        assert parent is not None
        rel = _join(parent, parts[-1])
        if member.isdir():
            self._directory(rel, mode, member)
        elif member.isreg():
            self._file(tar, member, rel, mode)
        elif member.issym():
            self._symlink(name, rel, parts, member)
        elif member.islnk():
            self._hardlink(name, rel, member)
        else:
            self.tree.clear(rel, keep_dir=False)
            os.mkfifo(self.tree.path(rel), 0o600)
            os.chmod(self.tree.path(rel), mode)
            self.stats.fifos += 1
        self._written(rel)

    def _parts(self, name: str, path: str) -> list[str]:
        """``path`` split into its components, refusing escapes."""
        if path.startswith("/"):
            self._refuse(name, f"the path {path[:_NAME_SHOWN]!r} is absolute")
        if "\0" in path:
            self._refuse(name, "the path has a NUL character")
        parts = [part for part in path.split("/") if part not in ("", ".")]
        if ".." in parts:
            self._refuse(name, f"the path {path[:_NAME_SHOWN]!r} has a '..' component")
        return parts

    def _mode(self, name: str, member: tarfile.TarInfo) -> int:
        mode = member.mode & 0o7777
        if member.isdir():
            return mode & ~stat.S_ISUID
        if mode & _SPECIAL_BITS and not (member.islnk() or member.issym()):
            if self.setuid == "refuse":
                self._refuse(name, f"it has the setuid or setgid bit (mode {mode:o})")
            return mode & ~_SPECIAL_BITS
        return mode & 0o1777

    def _directory(self, rel: str, mode: int, member: tarfile.TarInfo) -> None:
        self.tree.clear(rel, keep_dir=True)
        found = self.tree.lstat(rel)
        if found is None:
            # Owner-writable until the end, so later entries can go inside.
            os.mkdir(self.tree.path(rel), 0o700)
        self.tree.made_dir(rel, mode, _mtime(member))
        self.stats.directories += 1

    def _file(
        self, tar: tarfile.TarFile, member: tarfile.TarInfo, rel: str, mode: int
    ) -> None:
        self.tree.clear(rel, keep_dir=False)
        source = tar.extractfile(member)
        assert source is not None
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        fd = os.open(self.tree.path(rel), flags, 0o600)
        with open(fd, "wb", closefd=True) as out:
            while chunk := source.read(_COPY_CHUNK):
                out.write(chunk)
                self.stats.bytes_written += len(chunk)
            out.flush()
            os.fchmod(fd, mode)
            mtime = _mtime(member)
            if mtime is not None:
                os.utime(fd, (mtime, mtime))
        self.stats.files += 1

    def _symlink(
        self, name: str, rel: str, parts: list[str], member: tarfile.TarInfo
    ) -> None:
        target = member.linkname
        if not target or "\0" in target:
            self._refuse(name, "the symbolic link has no usable target")
        if not target.startswith("/"):
            depth = len(parts) - 1
            for part in target.split("/"):
                if part == "..":
                    depth -= 1
                elif part not in ("", "."):
                    depth += 1
                if depth < 0:
                    self._refuse(
                        name,
                        f"the symbolic link to {target[:_NAME_SHOWN]!r} points "
                        "outside the root",
                    )
        self.tree.clear(rel, keep_dir=False)
        os.symlink(target, self.tree.path(rel))
        mtime = _mtime(member)
        if mtime is not None:
            os.utime(self.tree.path(rel), (mtime, mtime), follow_symlinks=False)
        self.stats.symlinks += 1

    def _hardlink(self, name: str, rel: str, member: tarfile.TarInfo) -> None:
        target = member.linkname
        shown = repr(target[:_NAME_SHOWN])
        if target.startswith("/") or ".." in target.split("/"):
            self._refuse(name, f"the hard link to {shown} points outside the root")
        parts = self._parts(name, target)
        parent = None
        if parts:
            parent = self.tree.parent(parts, create=False, layer=self.digest, name=name)
        target_rel = _join(parent or "", parts[-1]) if parts else ""
        found = self.tree.lstat(target_rel) if parent is not None else None
        if found is None:
            self._refuse(name, f"the hard link names {shown}, which does not exist")
        if stat.S_ISDIR(found.st_mode):
            self._refuse(name, "a hard link cannot name a directory")
        if target_rel == rel:
            self._refuse(name, "the hard link names itself")
        self.tree.clear(rel, keep_dir=False)
        os.link(self.tree.path(target_rel), self.tree.path(rel), follow_symlinks=False)
        self.stats.hardlinks += 1

    def _whiteout(self, name: str, parts: list[str]) -> None:
        """Remove what lower layers left at a whited-out path."""
        self.stats.whiteouts += 1
        hidden = parts[-1][len(WHITEOUT) :]
        if hidden in ("", ".", ".."):
            self._refuse(name, "the whiteout names no entry")
        parent = self.tree.parent(parts, create=False, layer=self.digest, name=name)
        if parent is None:
            return
        if parts[-1] == OPAQUE:
            self._opaque(parent)
            return
        if hidden.startswith(WHITEOUT):
            return
        rel = _join(parent, hidden)
        if rel not in self.written:
            self.tree.clear(rel, keep_dir=False)

    def _opaque(self, rel: str) -> None:
        """Empty ``rel`` of what lower layers put there, keeping this layer's."""
        with os.scandir(self.tree.path(rel)) as entries:
            children = [(e.name, e.is_dir(follow_symlinks=False)) for e in entries]
        for child, is_dir in children:
            child_rel = _join(rel, child)
            if child_rel not in self.written:
                self.tree.clear(child_rel, keep_dir=False)
            elif is_dir:
                self._opaque(child_rel)

    def _written(self, rel: str) -> None:
        """Mark ``rel`` and its parents as this layer's own."""
        while rel and rel not in self.written:
            self.written.add(rel)
            rel = rel.rpartition("/")[0]

    def _refuse(self, name: str, reason: str) -> NoReturn:
        raise UnsafeLayerError(self.digest, name, reason)


def _join(parent: str, name: str) -> str:
    return f"{parent}/{name}" if parent else name


def _mtime(member: tarfile.TarInfo) -> float | None:
    mtime = member.mtime
    return float(mtime) if 0 <= mtime < _MAX_MTIME else None
