"""App VMs: archives and disks built for them, and real boots under QEMU.

The boots use a root file system of nothing but a static busybox, so the
image has no shell of its own. The platform's kernel is cached across runs in
``CRABGLAMP_TEST_CACHE`` (default ``~/.cache/crabglamp-test``) and fetched
with apt when that is empty.
"""

import asyncio
import json
import os
import shutil
import socket
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from importlib import resources
from pathlib import Path

import httpx
import pytest

from contracts.replies import ImageConfig
from services.deployer.vm import (
    AppExitedError,
    GuestPanickedError,
    HostPortInUseError,
    PlatformAssets,
    QemuDriver,
    VmConfigError,
    VmHandle,
    VmSpec,
    build_config_archive,
    build_rootfs_image,
    free_host_port,
)

CACHE = Path(
    os.environ.get("CRABGLAMP_TEST_CACHE", Path.home() / ".cache" / "crabglamp-test")
)
BOOT_TIMEOUT_S = 90.0
MARKER = f"served-{uuid.uuid4().hex}"
HTTPD = ["httpd", "-f", "-p", "8080", "-h", "/www"]


def read_newc(archive: bytes) -> dict[str, tuple[int, bytes]]:
    """Name → (mode, data) of every member of a newc cpio archive."""
    members: dict[str, tuple[int, bytes]] = {}
    offset = 0
    while True:
        assert archive[offset : offset + 6] == b"070701"
        fields = [
            int(archive[offset + 6 + 8 * i : offset + 14 + 8 * i], 16)
            for i in range(13)
        ]
        mode, size, name_size = fields[1], fields[6], fields[11]
        name_start = offset + 110
        name = archive[name_start : name_start + name_size - 1].decode()
        data_start = name_start + name_size + (-(110 + name_size) % 4)
        if name == "TRAILER!!!":
            return members
        members[name] = (mode, archive[data_start : data_start + size])
        offset = data_start + size + (-size % 4)


@pytest.fixture(scope="session")
async def assets() -> PlatformAssets:
    return await PlatformAssets.ensure(CACHE)


@pytest.fixture(scope="session")
async def driver(assets: PlatformAssets) -> QemuDriver:
    return QemuDriver(assets)


@pytest.fixture(scope="session")
def disk(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An image with no shell: a static busybox and a page to serve."""
    root = tmp_path_factory.mktemp("rootfs")
    (root / "bin").mkdir()
    (root / "www").mkdir()
    shutil.copy("/bin/busybox", root / "bin" / "busybox")
    (root / "www" / "index.html").write_text(f"{MARKER}\n")
    return build_rootfs_image(root, tmp_path_factory.mktemp("disk") / "root.ext4")


@asynccontextmanager
async def booted(
    driver: QemuDriver, disk: Path, config: ImageConfig, work_dir: Path
) -> AsyncIterator[VmHandle]:
    spec = VmSpec(
        deploy_id=work_dir.name,
        rootfs_image=disk,
        config=config,
        guest_port=8080,
        host_port=free_host_port(),
        work_dir=work_dir,
    )
    handle = await driver.start(spec)
    try:
        yield handle
    finally:
        await driver.stop(handle)


def httpd(**changes: object) -> ImageConfig:
    fields: dict[str, object] = {
        "entrypoint": ["/bin/busybox"],
        "cmd": HTTPD,
        "env": ["GREETING=hi"],
        "working_dir": "/www",
    }
    return ImageConfig.model_validate({**fields, **changes})


@pytest.mark.vm
async def test_the_image_serves_through_the_forwarded_port(
    driver: QemuDriver, disk: Path, tmp_path: Path
) -> None:
    async with booted(driver, disk, httpd(), tmp_path / "vm") as handle:
        seconds = await driver.wait_ready(handle, BOOT_TIMEOUT_S)
        async with httpx.AsyncClient() as client:
            page = await client.get(f"http://127.0.0.1:{handle.host_port}/index.html")
        assert 0 < seconds < BOOT_TIMEOUT_S
        assert page.status_code == 200
        assert page.text == f"{MARKER}\n"
        assert driver.running(handle)
    assert not driver.running(handle)
    assert not await asyncio.to_thread(Path(f"/proc/{handle.pid}").exists)
    console = handle.console_log.read_text()
    assert "crabglamp: starting /bin/busybox httpd -f -p 8080 -h /www" in console
    assert "crabglamp: app exited 143" in console
    assert not (handle.work_dir / "initramfs.cpio").exists()


@pytest.mark.vm
async def test_env_and_working_dir_reach_the_app_and_a_restart_can_stop_it(
    driver: QemuDriver, assets: PlatformAssets, disk: Path, tmp_path: Path
) -> None:
    script = (
        "echo $GREETING > /www/env.txt; pwd > /www/pwd.txt; "
        "exec busybox httpd -f -p 8080 -h /www"
    )
    config = httpd(cmd=["sh", "-c", script])
    async with booted(driver, disk, config, tmp_path / "vm") as handle:
        await driver.wait_ready(handle, BOOT_TIMEOUT_S)
        base_url = f"http://127.0.0.1:{handle.host_port}"
        async with httpx.AsyncClient(base_url=base_url) as client:
            env, pwd = await asyncio.gather(
                client.get("/env.txt"), client.get("/pwd.txt")
            )
        # A restarted deployer knows the VM only by its stored handle
        restarted = QemuDriver(assets)
        stored = VmHandle.from_json(handle.to_json())
        assert restarted.running(stored)
        await restarted.stop(stored)
        assert not restarted.running(stored)
        assert not driver.running(handle)
    assert env.text == "hi\n"
    assert pwd.text == "/www\n"
    assert "power button pressed" in handle.console_log.read_text()


@pytest.mark.vm
async def test_a_missing_entrypoint_powers_off_naming_it(
    driver: QemuDriver, disk: Path, tmp_path: Path
) -> None:
    config = httpd(entrypoint=["/no/such/app"])
    async with booted(driver, disk, config, tmp_path / "vm") as handle:
        with pytest.raises(AppExitedError) as failure:
            await driver.wait_ready(handle, BOOT_TIMEOUT_S)
        assert not driver.running(handle)
    assert failure.value.exit_code == 127
    assert "can't execute '/no/such/app': No such file" in failure.value.console_tail
    assert "/no/such/app" in str(failure.value)


@pytest.mark.vm
async def test_a_guest_panic_is_not_a_clean_exit(
    driver: QemuDriver, disk: Path, tmp_path: Path
) -> None:
    config = httpd(cmd=["sh", "-c", "echo c > /proc/sysrq-trigger"])
    async with booted(driver, disk, config, tmp_path / "vm") as handle:
        with pytest.raises(GuestPanickedError) as failure:
            await driver.wait_ready(handle, BOOT_TIMEOUT_S)
    assert not isinstance(failure.value, AppExitedError)
    assert "Kernel panic" in failure.value.console_tail


@pytest.mark.vm
async def test_a_taken_host_port_is_named(
    driver: QemuDriver, disk: Path, tmp_path: Path
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        spec = VmSpec(
            deploy_id="taken",
            rootfs_image=disk,
            config=httpd(),
            guest_port=8080,
            host_port=taken.getsockname()[1],
            work_dir=tmp_path / "vm",
        )
        with pytest.raises(HostPortInUseError) as failure:
            handle = await driver.start(spec)
            try:
                await driver.wait_ready(handle, BOOT_TIMEOUT_S)
            finally:
                await driver.stop(handle)
    assert str(spec.host_port) in str(failure.value)


def test_the_config_archive_round_trips_awkward_words(tmp_path: Path) -> None:
    argv = ["/bin/app", "it's", "two words", "$HOME", '"quoted"', "back\\slash"]
    config = ImageConfig(
        entrypoint=argv[:1],
        cmd=argv[1:],
        env=["A=x y", "B=it's $A", "PATH=/bin", "BROKEN"],
        working_dir="www/../srv",
    )
    archive = build_config_archive(config, 8080, tmp_path / "config.cpio").read_bytes()
    members = read_newc(archive)
    assert len(archive) % 4 == 0
    assert members["crabglamp/config.sh"][0] & 0o777 == 0o600
    (tmp_path / "config.sh").write_bytes(members["crabglamp/config.sh"][1])
    shown = subprocess.run(
        [
            "/bin/busybox",
            "sh",
            "-c",
            '. ./config.sh; eval "set -- $APP_ARGV"; printf "%s\\0" "$@"; '
            'eval "set -- $APP_ENV"; printf "%s\\0" "$@"; '
            'printf "%s|%s" "$WORKDIR" "$PORT"',
        ],
        cwd=tmp_path,
        capture_output=True,
        check=True,
    ).stdout.decode()
    words = shown.split("\0")
    assert words[:6] == argv
    assert words[6:9] == ["PATH=/bin", "HOME=/root", "A=x y"]
    assert words[9] == "B=it's $A"
    assert words[10] == "/srv|8080"


def test_an_image_without_a_command_is_refused(tmp_path: Path) -> None:
    with pytest.raises(VmConfigError):
        build_config_archive(ImageConfig(), 8080, tmp_path / "config.cpio")


def test_the_disk_holds_the_tree_with_headroom(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    (root / "etc" / "hostname").write_text("app\n")
    (root / "blob").write_bytes(os.urandom(3 * 1024 * 1024))
    (root / "link").symlink_to("etc/hostname")
    disk = build_rootfs_image(root, tmp_path / "root.ext4")
    listed = subprocess.run(
        ["debugfs", "-R", "cat /etc/hostname", str(disk)],
        capture_output=True,
        check=True,
        text=True,
    ).stdout
    assert listed == "app\n"
    assert disk.stat().st_size >= 3 * 1024 * 1024 * 1.3 + 32 * 1024 * 1024


def test_a_handle_survives_json_and_never_names_a_stranger(tmp_path: Path) -> None:
    handle = VmHandle(
        deploy_id="dep_1",
        pid=os.getpid(),
        host_port=40000,
        qmp_socket=tmp_path / "qmp.sock",
        console_log=tmp_path / "console.log",
        work_dir=tmp_path,
        started_at=1.5,
    )
    assert VmHandle.from_json(handle.to_json()) == handle
    assert json.loads(handle.to_json())["work_dir"] == str(tmp_path)


async def test_stop_leaves_a_process_that_is_not_the_vm_alone(
    assets: PlatformAssets, tmp_path: Path
) -> None:
    stranger = await asyncio.create_subprocess_exec("sleep", "30")
    try:
        handle = VmHandle(
            deploy_id="dep_1",
            pid=stranger.pid,
            host_port=40000,
            qmp_socket=tmp_path / "qmp.sock",
            console_log=tmp_path / "console.log",
            work_dir=tmp_path,
            started_at=0.0,
        )
        driver = QemuDriver(assets, accel="tcg")
        assert not driver.running(handle)
        await driver.stop(handle)
        assert stranger.returncode is None
    finally:
        stranger.kill()
        await stranger.wait()


async def test_two_processes_building_the_platform_agree(
    assets: PlatformAssets, tmp_path: Path
) -> None:
    # Seed the kernel so the race is over the initramfs, not a download
    kernel_dir = tmp_path / "platform" / "kernel" / assets.kernel_version
    shutil.copytree(assets.kernel.parent, kernel_dir)
    script = (
        "import asyncio, sys; from pathlib import Path; "
        "from services.deployer.vm import PlatformAssets; "
        "a = asyncio.run(PlatformAssets.ensure(Path(sys.argv[1]))); "
        "print(a.initramfs)"
    )
    racers = [
        await asyncio.create_subprocess_exec(
            sys.executable, "-c", script, str(tmp_path), stdout=asyncio.subprocess.PIPE
        )
        for _ in range(2)
    ]
    # The last line is the path; log lines may come before it
    outputs = [(await racer.communicate())[0].decode().split()[-1] for racer in racers]
    assert all(racer.returncode == 0 for racer in racers)
    assert outputs[0] == outputs[1]
    built = sorted((tmp_path / "platform").glob("initramfs-*.cpio"))
    assert [str(path) for path in built] == [outputs[0]]
    members = read_newc(built[0].read_bytes())
    init = resources.files("services.deployer").joinpath("vm_init.sh")
    assert members["init"][1] == init.read_bytes()
    assert "lib/modules/ext4.ko" in members
