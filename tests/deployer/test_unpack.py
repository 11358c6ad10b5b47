"""Applying layers to a root file system: whiteouts, and hostile layers refused.

Every hostile case checks that nothing appeared outside the root: the root
lives next to a sentinel directory that an escape would write into.
"""

import gzip
import hashlib
import io
import os
import stat
import tarfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import zstandard

from services.deployer.pull import Layer
from services.deployer.unpack import (
    CorruptLayerError,
    UnsafeLayerError,
    unpack_layers,
)

GZIP_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"
PLAIN_LAYER = "application/vnd.oci.image.layer.v1.tar"
MB = 1024 * 1024


@dataclass
class Entry:
    """One tar entry; ``kind`` is a tarfile type constant."""

    name: str
    data: bytes = b""
    kind: bytes = tarfile.REGTYPE
    mode: int = 0o644
    link: str = ""
    extra: dict[str, int] = field(default_factory=dict)


def file(name: str, data: bytes = b"x", mode: int = 0o644) -> Entry:
    return Entry(name, data, mode=mode)


def directory(name: str, mode: int = 0o755) -> Entry:
    return Entry(name, kind=tarfile.DIRTYPE, mode=mode)


def symlink(name: str, target: str) -> Entry:
    return Entry(name, kind=tarfile.SYMTYPE, mode=0o777, link=target)


def hardlink(name: str, target: str) -> Entry:
    return Entry(name, kind=tarfile.LNKTYPE, link=target)


def tar_bytes(entries: list[Entry]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for entry in entries:
            info = tarfile.TarInfo(entry.name)
            info.type, info.mode, info.linkname = entry.kind, entry.mode, entry.link
            info.mtime = 1_700_000_000
            for key, value in entry.extra.items():
                setattr(info, key, value)
            if entry.kind == tarfile.REGTYPE:
                info.size = len(entry.data)
                tar.addfile(info, io.BytesIO(entry.data))
            else:
                tar.addfile(info)
    return buffer.getvalue()


class Box:
    """A root to unpack into, a sentinel next to it, and a place for layers."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.root = base / "box" / "root"
        self.sentinel = base / "box" / "sentinel"
        self.sentinel.mkdir(parents=True)
        (self.sentinel / "keep").write_text("untouched")
        self.layers = base / "layers"
        self.layers.mkdir()

    def layer(self, entries: list[Entry] | bytes, *, gzipped: bool = True) -> Layer:
        plain = entries if isinstance(entries, bytes) else tar_bytes(entries)
        blob = gzip.compress(plain, mtime=0) if gzipped else plain
        return self.blob_layer(blob, GZIP_LAYER if gzipped else PLAIN_LAYER)

    def blob_layer(self, blob: bytes, media_type: str) -> Layer:
        digest = "sha256:" + hashlib.sha256(blob).hexdigest()
        path = self.layers / digest.partition(":")[2]
        path.write_bytes(blob)
        return Layer(digest, media_type, len(blob), path)

    def outside(self) -> set[str]:
        """Everything under the box that is not in the root."""
        found = set()
        for path in (self.base / "box").rglob("*"):
            if self.root not in path.parents and path != self.root:
                found.add(str(path.relative_to(self.base)))
        return found


@pytest.fixture
def box(tmp_path: Path) -> Box:
    return Box(tmp_path)


def test_layers_apply_in_order_with_modes_links_and_whiteouts(box: Box) -> None:
    lower = box.layer(
        [
            directory("etc"),
            file("etc/keep", b"kept"),
            file("etc/gone", b"old"),
            directory("var/cache"),
            file("var/cache/a", b"1"),
            file("var/cache/deep/b", b"2"),
            directory("opt/tool"),
            file("opt/tool/bin", b"#!", mode=0o755),
            file("srv/config", b"old"),
            directory("tmp", mode=0o1777),
            symlink("srv/link", "config"),
        ]
    )
    upper = box.layer(
        [
            file("etc/.wh.gone"),
            directory("var/cache"),
            file("var/cache/.wh..wh..opq"),
            file("var/cache/new", b"3"),
            file(".wh.opt"),
            file("srv/config", b"new", mode=0o600),
            hardlink("srv/same", "srv/config"),
            symlink("usr/bin/env", "/bin/busybox"),
            symlink("lib", "usr/lib"),
            Entry("run/fifo", kind=tarfile.FIFOTYPE, mode=0o600),
        ]
    )

    stats = unpack_layers([lower, upper], box.root)

    root = box.root
    assert (root / "etc/keep").read_bytes() == b"kept"
    assert not (root / "etc/gone").exists()
    assert sorted(os.listdir(root / "var/cache")) == ["new"]
    assert not (root / "opt").exists()
    assert (root / "srv/config").read_bytes() == b"new"
    assert stat.S_IMODE((root / "srv/config").stat().st_mode) == 0o600
    assert (root / "srv/same").stat().st_ino == (root / "srv/config").stat().st_ino
    assert os.readlink(root / "srv/link") == "config"
    assert os.readlink(root / "usr/bin/env") == "/bin/busybox"
    assert os.readlink(root / "lib") == "usr/lib"
    assert stat.S_ISFIFO(os.lstat(root / "run/fifo").st_mode)
    assert stat.S_IMODE((root / "tmp").stat().st_mode) == 0o1777
    assert (root / "etc/keep").stat().st_mtime == 1_700_000_000
    assert stats.layers == 2
    assert stats.whiteouts == 3
    assert box.outside() == {"box/sentinel", "box/sentinel/keep"}


def test_whiteouts_never_remove_what_their_own_layer_wrote(box: Box) -> None:
    lower = box.layer([file("a/old", b"1"), file("b", b"lower")])
    upper = box.layer(
        [
            file("a/new", b"2"),
            file("a/.wh..wh..opq"),
            file("b", b"upper"),
            file(".wh.b"),
        ]
    )

    unpack_layers([lower, upper], box.root)

    assert sorted(os.listdir(box.root / "a")) == ["new"]
    assert (box.root / "b").read_bytes() == b"upper"


def test_an_opaque_directory_keeps_this_layers_subdirectories(box: Box) -> None:
    lower = box.layer([file("app/sub/old", b"1"), file("app/other/x", b"2")])
    upper = box.layer([file("app/.wh..wh..opq"), file("app/sub/new", b"3")])

    unpack_layers([lower, upper], box.root)

    assert sorted(os.listdir(box.root / "app")) == ["sub"]
    assert sorted(os.listdir(box.root / "app/sub")) == ["new"]


def test_a_later_layer_replaces_a_directory_with_a_file(box: Box) -> None:
    lower = box.layer([file("data/inner/x", b"1")])
    upper = box.layer([file("data", b"flat")])

    unpack_layers([lower, upper], box.root)

    assert (box.root / "data").read_bytes() == b"flat"


def test_an_uncompressed_layer_unpacks(box: Box) -> None:
    layer = box.layer([file("hello", b"world")], gzipped=False)

    unpack_layers([layer], box.root)

    assert (box.root / "hello").read_bytes() == b"world"


def test_a_zstd_layer_unpacks(box: Box) -> None:
    blob = zstandard.ZstdCompressor().compress(tar_bytes([file("z", b"zstd")]))
    layer = box.blob_layer(blob, "application/vnd.oci.image.layer.v1.tar+zstd")

    unpack_layers([layer], box.root)

    assert (box.root / "z").read_bytes() == b"zstd"


Hostile = Callable[[Box], list[list[Entry]]]


def traversal(box: Box) -> list[list[Entry]]:
    return [[file("../sentinel/pwned")]]


def deep_traversal(box: Box) -> list[list[Entry]]:
    return [[file("usr/../../sentinel/pwned")]]


def absolute(box: Box) -> list[list[Entry]]:
    return [[file(str(box.sentinel / "pwned"))]]


def symlink_escape(box: Box) -> list[list[Entry]]:
    return [[symlink("evil", "../../.."), file("evil/pwned")]]


def symlink_escape_to_sentinel(box: Box) -> list[list[Entry]]:
    return [[symlink("evil", "../sentinel"), file("evil/pwned")]]


def through_absolute_symlink(box: Box) -> list[list[Entry]]:
    return [[symlink("evil", str(box.sentinel)), file("evil/pwned")]]


def through_symlink_of_a_lower_layer(box: Box) -> list[list[Entry]]:
    return [[symlink("evil", str(box.sentinel))], [file("evil/pwned")]]


def whiteout_through_symlink(box: Box) -> list[list[Entry]]:
    return [[symlink("evil", str(box.sentinel))], [file("evil/.wh.keep")]]


def opaque_through_symlink(box: Box) -> list[list[Entry]]:
    return [[symlink("evil", str(box.sentinel))], [file("evil/.wh..wh..opq")]]


def hard_link_out(box: Box) -> list[list[Entry]]:
    return [[hardlink("passwd", "../../etc/passwd")]]


def hard_link_to_sentinel(box: Box) -> list[list[Entry]]:
    return [[hardlink("stolen", "../sentinel/keep")]]


def hard_link_absolute(box: Box) -> list[list[Entry]]:
    return [[hardlink("stolen", str(box.sentinel / "keep"))]]


def hard_link_through_symlink(box: Box) -> list[list[Entry]]:
    return [[symlink("evil", str(box.sentinel)), hardlink("stolen", "evil/keep")]]


def hard_link_to_nothing(box: Box) -> list[list[Entry]]:
    return [[hardlink("stolen", "not/there")]]


def device_node(box: Box) -> list[list[Entry]]:
    extra = {"devmajor": 1, "devminor": 3}
    return [[Entry("dev/null", kind=tarfile.CHRTYPE, mode=0o666, extra=extra)]]


def block_device(box: Box) -> list[list[Entry]]:
    extra = {"devmajor": 8, "devminor": 0}
    return [[Entry("dev/sda", kind=tarfile.BLKTYPE, mode=0o660, extra=extra)]]


def setuid_file(box: Box) -> list[list[Entry]]:
    return [[file("usr/bin/su", b"\x7fELF", mode=0o4755)]]


def setgid_file(box: Box) -> list[list[Entry]]:
    return [[file("usr/bin/wall", b"\x7fELF", mode=0o2755)]]


@pytest.mark.parametrize(
    ("hostile", "entry", "reason"),
    [
        (traversal, "../sentinel/pwned", "'..' component"),
        (deep_traversal, "usr/../../sentinel/pwned", "'..' component"),
        (absolute, "/", "is absolute"),
        (symlink_escape, "evil", "points outside the root"),
        (symlink_escape_to_sentinel, "evil", "points outside the root"),
        (through_absolute_symlink, "evil/pwned", "passes through the symbolic link"),
        (
            through_symlink_of_a_lower_layer,
            "evil/pwned",
            "passes through the symbolic link",
        ),
        (whiteout_through_symlink, "evil/.wh.keep", "passes through"),
        (opaque_through_symlink, "evil/.wh..wh..opq", "passes through"),
        (hard_link_out, "passwd", "points outside the root"),
        (hard_link_to_sentinel, "stolen", "points outside the root"),
        (hard_link_absolute, "stolen", "points outside the root"),
        (hard_link_through_symlink, "stolen", "passes through the symbolic link"),
        (hard_link_to_nothing, "stolen", "does not exist"),
        (device_node, "dev/null", "device nodes"),
        (block_device, "dev/sda", "device nodes"),
        (setuid_file, "usr/bin/su", "setuid"),
        (setgid_file, "usr/bin/wall", "setgid"),
    ],
)
def test_a_hostile_layer_is_refused_naming_its_entry(
    box: Box, hostile: Hostile, entry: str, reason: str
) -> None:
    layers = [box.layer(entries) for entries in hostile(box)]

    with pytest.raises(UnsafeLayerError) as caught:
        unpack_layers(layers, box.root)

    error = caught.value
    assert error.entry_name.startswith(entry)
    assert error.layer_digest == layers[-1].digest
    assert reason in str(error)
    assert repr(error.entry_name[:200]) in str(error)
    assert box.outside() == {"box/sentinel", "box/sentinel/keep"}
    assert (box.sentinel / "keep").read_text() == "untouched"
    assert not (box.base / "box" / "pwned").exists()


def test_setuid_bits_can_be_stripped_instead(box: Box) -> None:
    layer = box.layer([file("usr/bin/su", b"\x7fELF", mode=0o6755)])

    unpack_layers([layer], box.root, setuid="strip")

    mode = stat.S_IMODE((box.root / "usr/bin/su").stat().st_mode)
    assert mode == 0o755


def test_a_setgid_directory_keeps_its_bit(box: Box) -> None:
    layer = box.layer([directory("var/mail", mode=0o2775)])

    unpack_layers([layer], box.root)

    assert stat.S_IMODE((box.root / "var/mail").stat().st_mode) == 0o2775


def test_a_gzip_bomb_is_stopped_at_the_byte_limit(box: Box) -> None:
    plain_size = 100 * MB
    compressor = zlib.compressobj(9, zlib.DEFLATED, 31)
    header = tarfile.TarInfo("var/zeros")
    header.size = plain_size
    parts = [compressor.compress(header.tobuf(format=tarfile.PAX_FORMAT))]
    zeros = bytes(MB)
    parts += [compressor.compress(zeros) for _ in range(plain_size // MB)]
    parts.append(compressor.compress(bytes(1024)) + compressor.flush())
    layer = box.blob_layer(b"".join(parts), GZIP_LAYER)
    assert layer.size < plain_size // 500

    with pytest.raises(UnsafeLayerError) as caught:
        unpack_layers([layer], box.root, max_bytes=10 * MB)

    assert caught.value.entry_name == "var/zeros"
    assert "more than 10485760 bytes" in str(caught.value)
    written = (box.root / "var/zeros").stat().st_size
    assert written <= 10 * MB
    assert box.outside() == {"box/sentinel", "box/sentinel/keep"}


def test_the_byte_limit_counts_across_layers(box: Box) -> None:
    layers = [box.layer([file(f"f{n}", bytes(600 * 1024))]) for n in range(2)]

    with pytest.raises(UnsafeLayerError) as caught:
        unpack_layers(layers, box.root, max_bytes=MB)

    assert caught.value.layer_digest == layers[1].digest


def test_too_many_entries_are_refused(box: Box) -> None:
    layer = box.layer([file(f"f{n}") for n in range(20)])

    with pytest.raises(UnsafeLayerError) as caught:
        unpack_layers([layer], box.root, max_entries=10)

    assert caught.value.entry_name == "f10"
    assert "more than 10 entries" in str(caught.value)


def test_a_truncated_layer_is_corrupt(box: Box) -> None:
    blob = gzip.compress(tar_bytes([file("a", os.urandom(100_000))]))
    layer = box.blob_layer(blob[: len(blob) // 2], GZIP_LAYER)

    with pytest.raises(CorruptLayerError) as caught:
        unpack_layers([layer], box.root)

    assert caught.value.layer_digest == layer.digest


def test_a_layer_that_is_not_gzip_is_corrupt(box: Box) -> None:
    layer = box.blob_layer(b"this is not a layer", GZIP_LAYER)

    with pytest.raises(CorruptLayerError):
        unpack_layers([layer], box.root)


def test_a_file_over_a_lower_symlink_replaces_the_link_not_its_target(
    box: Box,
) -> None:
    lower = box.layer([symlink("keep", str(box.sentinel / "keep"))])
    upper = box.layer([file("keep", b"mine"), directory("dir")])
    again = box.layer([symlink("dir", str(box.sentinel)), directory("dir")])

    unpack_layers([lower, upper, again], box.root)

    assert not (box.root / "keep").is_symlink()
    assert (box.root / "keep").read_bytes() == b"mine"
    assert (box.root / "dir").is_dir() and not (box.root / "dir").is_symlink()
    assert (box.sentinel / "keep").read_text() == "untouched"
    assert box.outside() == {"box/sentinel", "box/sentinel/keep"}
