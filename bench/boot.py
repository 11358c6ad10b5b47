"""App VM boot: QemuDriver ÷ a bare QEMU command, to the first HTTP answer.

Both boot the same kernel, the same initramfs (platform plus the same
per-deploy config) and the same ext4 disk, a static busybox serving a page.
The bare command is VM.md's recipe typed out by hand: no QMP, no pvpanic, no
readiness logic, QEMU's default CPU model; it is polled with plain httpx.
Runs alternate between the two so that load on the machine hits both alike.
"""

import asyncio
import os
import shutil
import statistics
import tempfile
from pathlib import Path
from time import perf_counter

import httpx

from contracts.replies import ImageConfig
from services.backbone.settings import Settings
from services.deployer.vm import (
    PlatformAssets,
    QemuDriver,
    VmSpec,
    build_config_archive,
    build_rootfs_image,
    free_host_port,
)

ROUNDS = 3
PORT = 8080
TIMEOUT_S = 120.0
CONFIG = ImageConfig(
    entrypoint=["/bin/busybox"],
    cmd=["httpd", "-f", "-p", str(PORT), "-h", "/www"],
    working_dir="/www",
)


def build_disk(directory: Path) -> Path:
    root = directory / "root"
    (root / "bin").mkdir(parents=True)
    (root / "www").mkdir()
    shutil.copy("/bin/busybox", root / "bin" / "busybox")
    (root / "www" / "index.html").write_text("bench\n")
    return build_rootfs_image(root, directory / "root.ext4")


async def ours(driver: QemuDriver, disk: Path, directory: Path, run: int) -> float:
    spec = VmSpec(
        deploy_id=f"bench-{run}",
        rootfs_image=disk,
        config=CONFIG,
        guest_port=PORT,
        host_port=free_host_port(),
        work_dir=directory / f"ours-{run}",
    )
    started = perf_counter()
    handle = await driver.start(spec)
    try:
        await driver.wait_ready(handle, TIMEOUT_S)
        return perf_counter() - started
    finally:
        await driver.stop(handle)


async def bare(
    assets: PlatformAssets, accel: str, disk: Path, directory: Path, run: int
) -> float:
    work = directory / f"bare-{run}"
    work.mkdir()
    config = build_config_archive(CONFIG, PORT, work / "config.cpio")
    initramfs = work / "initramfs.cpio"
    initramfs.write_bytes(assets.initramfs.read_bytes() + config.read_bytes())
    port = free_host_port()
    command = [
        "qemu-system-x86_64",
        "-M",
        "q35",
        "-accel",
        accel,
        *(["-cpu", "host"] if accel == "kvm" else []),
        "-m",
        "128",
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
        "-no-reboot",
        "-serial",
        f"file:{work / 'console.log'}",
        "-kernel",
        str(assets.kernel),
        "-initrd",
        str(initramfs),
        "-append",
        "console=ttyS0 panic=-1 quiet cryptomgr.notests i8042.noaux i8042.nomux"
        " i8042.nopnp i8042.dumbkbd 8250.nr_uarts=1 no_timer_check",
        "-netdev",
        f"user,id=n0,hostfwd=tcp:127.0.0.1:{port}-:{PORT}",
        "-device",
        "virtio-net-pci,netdev=n0,romfile=",
        "-drive",
        f"file={disk},if=none,id=root,format=raw,snapshot=on",
        "-device",
        "virtio-blk-pci,drive=root",
    ]
    started = perf_counter()
    process = await asyncio.create_subprocess_exec(
        *command, env={**os.environ, "TMPDIR": str(work)}
    )
    try:
        async with httpx.AsyncClient(timeout=0.5) as client:
            while perf_counter() - started < TIMEOUT_S:
                try:
                    await client.get(f"http://127.0.0.1:{port}/")
                    return perf_counter() - started
                except httpx.TransportError:
                    await asyncio.sleep(0.05)
        raise TimeoutError("the bare VM never answered")
    finally:
        process.kill()
        await process.wait()


async def main() -> None:
    data_dir = Settings().data_dir.resolve() / "deployer"
    assets = await PlatformAssets.ensure(data_dir)
    driver = QemuDriver(assets)
    accel = await driver.accel()
    with tempfile.TemporaryDirectory() as scratch:
        directory = Path(scratch)
        disk = build_disk(directory)
        await bare(assets, accel, disk, directory, -1)  # warm the page cache
        ours_s: list[float] = []
        bare_s: list[float] = []
        for run in range(ROUNDS):
            ours_s.append(await ours(driver, disk, directory, run))
            bare_s.append(await bare(assets, accel, disk, directory, run))
    ours_median = statistics.median(ours_s)
    bare_median = statistics.median(bare_s)
    print(f"boot to first HTTP answer ({accel}, median of {ROUNDS})")
    print(f"QemuDriver:       {ours_median:.2f} s  {[round(s, 2) for s in ours_s]}")
    print(f"bare QEMU:        {bare_median:.2f} s  {[round(s, 2) for s in bare_s]}")
    print(f"ratio ours/bare:  {ours_median / bare_median:.2f}")


if __name__ == "__main__":
    asyncio.run(main())
