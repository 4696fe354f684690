"""Image files, loop devices and mounts (root), plus the parsers behind them (no root)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vm_images import images, instance
from vm_images.__main__ import EXIT_FAILED, EXIT_OK, EXIT_USAGE, UsageError, image_path, parse_size

REPO = Path(__file__).resolve().parent.parent
MIB = 1 << 20
TAG = "h10a"


def _losetup_j(path: Path) -> str:
    return subprocess.run(["losetup", "-j", str(path)], capture_output=True, text=True, check=True).stdout


def _mountpoints_under(prefix: str) -> list[str]:
    with open("/proc/self/mountinfo", encoding="utf-8") as table:
        points = [line.split()[4] for line in table]
    return [point for point in points if point.startswith(prefix)]


@pytest.fixture
def root() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root (loop devices, mount)")
    if shutil.which("losetup") is None or shutil.which("mkfs.ext4") is None:
        pytest.skip("needs losetup and mkfs.ext4")


@pytest.fixture
def image_dir(root: None) -> Iterator[Path]:
    """A throwaway image directory on a real file system, cleaned up whatever happens.

    The cleanup uses the system tools directly, not the code under test, so a bug in
    ``umount``/``detach`` cannot leave loop devices or mounts behind.
    """
    directory = Path(tempfile.mkdtemp(prefix=f"arx-{TAG}-img.", dir="/var/tmp"))
    mount_prefix = f"/tmp/arx-{TAG}-{directory.name.rsplit('.', 1)[1]}"
    try:
        yield directory
    finally:
        for point in sorted(_mountpoints_under(mount_prefix), reverse=True):
            subprocess.run(["umount", point], capture_output=True)
        for image in directory.glob("*"):
            for line in _losetup_j(image).splitlines():
                subprocess.run(["losetup", "-d", line.split(":", 1)[0]], capture_output=True)
        shutil.rmtree(directory, ignore_errors=True)
        for leftover in Path("/tmp").glob(Path(mount_prefix).name + "*"):
            shutil.rmtree(leftover, ignore_errors=True)


@pytest.fixture
def mount_dir(image_dir: Path) -> Path:
    return Path(f"/tmp/arx-{TAG}-{image_dir.name.rsplit('.', 1)[1]}")


@pytest.mark.root
def test_create_raw_is_sparse_and_idempotent(image_dir: Path) -> None:
    path = images.create_raw(image_dir / "vsic.img", images.DEFAULT_RAW_SIZE)
    st_before = os.stat(path)
    assert st_before.st_size == 1 << 30
    assert st_before.st_blocks * 512 < MIB  # a hole, not a gigabyte of zeros
    with open(path, "r+b") as handle:
        handle.seek(12345)
        handle.write(b"keep me")
    assert images.create_raw(path, images.DEFAULT_RAW_SIZE) == path
    assert os.stat(path).st_ino == st_before.st_ino
    with open(path, "rb") as handle:
        handle.seek(12345)
        assert handle.read(7) == b"keep me"
    assert images.detect_kind(path) == "raw"


@pytest.mark.root
def test_create_raw_refuses_a_size_change_unless_asked(image_dir: Path) -> None:
    path = images.create_raw(image_dir / "r.img", 8 * MIB)
    with pytest.raises(images.ImageError, match="resize=True"):
        images.create_raw(path, 16 * MIB)
    assert os.stat(path).st_size == 8 * MIB
    device = images.attach(path)
    images.create_raw(path, 16 * MIB, resize=True)
    assert os.stat(path).st_size == 16 * MIB
    size = subprocess.run(["blockdev", "--getsize64", device], capture_output=True, text=True, check=True).stdout
    assert int(size) == 16 * MIB  # the attached loop device saw the new capacity


@pytest.mark.parametrize("size", [0, -4096, 4095, 4097, True, 1.0])
def test_sizes_must_be_whole_positive_blocks(tmp_path: Path, size: object) -> None:
    with pytest.raises(images.ImageError, match="size"):
        images.create_raw(tmp_path / "x.img", size)  # type: ignore[arg-type]
    assert not (tmp_path / "x.img").exists()


def test_create_refuses_what_is_not_a_regular_file(tmp_path: Path) -> None:
    (tmp_path / "d.img").mkdir()
    with pytest.raises(images.ImageError, match="not a regular file"):
        images.create_raw(tmp_path / "d.img", MIB)
    with pytest.raises(images.ImageError, match="not a regular file"):
        images.create_ext4(tmp_path / "d.img", MIB)


@pytest.mark.root
def test_create_ext4_keeps_an_existing_ext4_image_and_never_formats_others(image_dir: Path) -> None:
    path = images.create_ext4(image_dir / "base.img", 32 * MIB)
    assert images.detect_kind(path) == "ext4"
    with open(path, "rb") as handle:
        handle.seek(1024 + 0x68)  # s_uuid: a reformat would draw a new one
        uuid = handle.read(16)
    images.create_ext4(path, 32 * MIB)
    with open(path, "rb") as handle:
        handle.seek(1024 + 0x68)
        assert handle.read(16) == uuid
    raw = images.create_raw(image_dir / "raw.img", 32 * MIB)
    with pytest.raises(images.ImageError, match="not an ext4 image"):
        images.create_ext4(raw, 32 * MIB)
    assert images.detect_kind(raw) == "raw"


@pytest.mark.root
def test_attach_twice_gives_the_same_loop_and_detach_leaves_none(image_dir: Path) -> None:
    path = images.create_raw(image_dir / "vsic.img", 16 * MIB)
    device = images.attach(path)
    assert device.startswith("/dev/loop")
    assert images.attach(path) == device
    assert images.attach(str(path)) == device
    loops = images.loop_devices(path)
    assert [loop.device for loop in loops] == [device]
    assert loops[0].direct_io and not loops[0].read_only  # /var/tmp is a real file system
    assert images.detach(path) == [device]
    assert _losetup_j(path) == ""
    assert images.detach(path) == []  # nothing attached: not an error


@pytest.mark.root
def test_attach_read_only(image_dir: Path) -> None:
    path = images.create_raw(image_dir / "ro.img", 4 * MIB)
    images.attach(path, direct_io=False, read_only=True)
    (loop,) = images.loop_devices(path)
    assert loop.read_only and not loop.direct_io


@pytest.mark.root
def test_attach_falls_back_to_buffered_io_when_direct_io_is_refused(
    image_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_run = images._run

    def no_direct_io(argv: Sequence[str]) -> subprocess.CompletedProcess[str]:
        if "--direct-io=on" in argv:
            return subprocess.CompletedProcess(list(argv), 1, "", "losetup: failed to set direct io: Invalid argument")
        return real_run(argv)

    monkeypatch.setattr(images, "_run", no_direct_io)
    path = images.create_raw(image_dir / "tmpfs-like.img", 4 * MIB)
    device = images.attach(path)
    info = images.image_info(path)
    assert info.loop_devices == (device,)
    assert not info.direct_io


@pytest.mark.root
def test_attach_reports_a_missing_file(image_dir: Path) -> None:
    with pytest.raises(images.ImageError, match="does not exist"):
        images.attach(image_dir / "nothing.img")


@pytest.mark.root
def test_ext4_mount_and_umount(image_dir: Path, mount_dir: Path) -> None:
    path = images.create_ext4(image_dir / "base.img", 32 * MIB)
    device = images.mount(path, mount_dir)
    assert images.mount(path, mount_dir) == device  # idempotent
    assert str(mount_dir) in _mountpoints_under(str(mount_dir))
    (mount_dir / "appendonly.aof").write_text("SET k v\n")
    with pytest.raises(images.ImageError, match="umount it first"):
        images.detach(path)
    assert images.umount(mount_dir) == device
    assert _mountpoints_under(str(mount_dir)) == []
    assert _losetup_j(path) == ""  # the loop device went with the mount
    assert images.umount(mount_dir) is None
    images.mount(path, mount_dir)
    assert (mount_dir / "appendonly.aof").read_text() == "SET k v\n"
    images.umount(mount_dir)


@pytest.mark.root
def test_mount_refuses_a_raw_image_and_an_occupied_mountpoint(image_dir: Path, mount_dir: Path) -> None:
    raw = images.create_raw(image_dir / "raw.img", 8 * MIB)
    with pytest.raises(images.ImageError, match="not an ext4 image"):
        images.mount(raw, mount_dir)
    first = images.create_ext4(image_dir / "one.img", 16 * MIB)
    second = images.create_ext4(image_dir / "two.img", 16 * MIB)
    images.mount(first, mount_dir)
    with pytest.raises(images.ImageError, match="already has"):
        images.mount(second, mount_dir)


@pytest.mark.root
def test_list_images_reports_kind_loops_and_mounts(image_dir: Path, mount_dir: Path) -> None:
    images.create_raw(image_dir / "a.img", 8 * MIB)
    images.create_ext4(image_dir / "b.img", 16 * MIB)
    (image_dir / "notes.txt").write_text("not an image")
    raw_device = images.attach(image_dir / "a.img")
    ext4_device = images.mount(image_dir / "b.img", mount_dir)
    infos = images.list_images(image_dir)
    assert [(info.path.name, info.kind, info.size_bytes) for info in infos] == [
        ("a.img", "raw", 8 * MIB),
        ("b.img", "ext4", 16 * MIB),
    ]
    assert infos[0].loop_devices == (raw_device,) and infos[0].mountpoint is None and infos[0].direct_io
    assert infos[1].loop_devices == (ext4_device,) and infos[1].mountpoint == str(mount_dir)
    assert images.list_images(image_dir / "missing") == []


@pytest.mark.root
def test_instance_up_down_leaves_nothing_attached(image_dir: Path, mount_dir: Path) -> None:
    paths = instance.instance_images(TAG, mount_dir, image_dir)
    assert TAG in paths.raw_path.name and TAG in paths.ext4_path.name
    attached = instance.up(paths, raw_size=16 * MIB, ext4_size=16 * MIB)
    assert attached.raw_direct_io and attached.mountpoint == mount_dir
    assert instance.up(paths, raw_size=16 * MIB, ext4_size=16 * MIB) == attached
    instance.down(paths)
    assert _losetup_j(paths.raw_path) == "" and _losetup_j(paths.ext4_path) == ""
    assert _mountpoints_under(str(mount_dir)) == []
    assert paths.raw_path.exists() and paths.ext4_path.exists()  # the data outlives down
    instance.down(paths)  # twice: nothing there, no error


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "vm_images", *args], cwd=REPO, capture_output=True, text=True, timeout=60
    )


@pytest.mark.root
def test_cli_round_trip(image_dir: Path) -> None:
    where = ["--dir", str(image_dir)]
    created = _cli("create", "vsic", "--size", "64M", *where)
    assert created.returncode == EXIT_OK, created.stderr
    assert created.stdout.strip() == str(image_dir / "vsic.img")
    assert _cli("create", "base", "--size", "16MiB", "--kind", "ext4", *where).returncode == EXIT_OK
    attached = _cli("attach", "vsic", *where)
    assert attached.returncode == EXIT_OK, attached.stderr
    device = attached.stdout.strip()
    assert _cli("attach", "vsic", *where).stdout.strip() == device
    listing = _cli("list", "-j", *where)
    assert listing.returncode == EXIT_OK, listing.stderr
    by_name = {entry["name"]: entry for entry in json.loads(listing.stdout)}
    assert by_name["vsic"]["kind"] == "raw" and by_name["vsic"]["size_bytes"] == 64 * MIB
    assert [loop["device"] for loop in by_name["vsic"]["loop_devices"]] == [device]
    assert by_name["base"]["kind"] == "ext4" and by_name["base"]["loop_devices"] == []
    table = _cli("list", *where).stdout
    assert table.splitlines()[0].split()[:3] == ["NAME", "KIND", "SIZE"] and device in table
    detached = _cli("detach", "vsic", *where)
    assert detached.returncode == EXIT_OK and detached.stdout.strip() == device
    assert _losetup_j(image_dir / "vsic.img") == ""


@pytest.mark.root
@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["create", "../etc/x", "--size", "1G"], EXIT_USAGE, "bad image name"),
        (["create", "x", "--size", "1.5G"], EXIT_USAGE, "bad size"),
        (["create", "x", "--size", "1000"], EXIT_USAGE, "multiple of 4096"),
        (["create", "x", "--size", "1G", "--kind", "qcow2"], EXIT_USAGE, "invalid choice"),
        (["create", "taken", "--size", "8M"], EXIT_FAILED, "resize=True"),
        (["attach", "missing"], EXIT_FAILED, "does not exist"),
        (["frobnicate"], EXIT_USAGE, "invalid choice"),
    ],
)
def test_cli_errors_have_clear_messages_and_exit_codes(
    image_dir: Path, args: list[str], code: int, message: str
) -> None:
    images.create_raw(image_dir / "taken.img", 4 * MIB)
    result = _cli(*args, "--dir", str(image_dir)) if args[0] != "frobnicate" else _cli(*args)
    assert result.returncode == code, result.stderr
    assert message in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("text", "size"),
    [("4096", 4096), ("1G", 1 << 30), ("512M", 512 * MIB), ("64KiB", 64 << 10), ("2g", 2 << 30), ("1T", 1 << 40)],
)
def test_parse_size(text: str, size: int) -> None:
    assert parse_size(text) == size


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=20))
def test_random_size_text_raises_only_usage_errors(text: str) -> None:
    try:
        size = parse_size(text)
    except UsageError:
        return
    assert size > 0 and size % images.SIZE_ALIGNMENT == 0


@pytest.mark.parametrize(
    ("name", "ok"),
    [("vsic", True), ("vsic.img", True), ("a" * 64, True), ("a" * 65, False), (".hidden", False),
     ("..", False), ("a/b", False), ("", False), ("sp ace", False)],
)
def test_image_names_stay_inside_the_directory(name: str, ok: bool) -> None:
    directory = Path("/var/lib/arrakis/images")
    if ok:
        assert image_path(directory, name).parent == directory
    else:
        with pytest.raises(UsageError):
            image_path(directory, name)


def test_losetup_json_is_parsed_and_checked() -> None:
    text = json.dumps({"loopdevices": [
        {"name": "/dev/loop10", "dio": False, "ro": True},
        {"name": "/dev/loop2", "dio": "1", "ro": "0"},
    ]})
    assert images._parse_loop_list(text) == [
        images.LoopDevice("/dev/loop2", direct_io=True, read_only=False),
        images.LoopDevice("/dev/loop10", direct_io=False, read_only=True),
    ]
    assert images._parse_loop_list("") == []
    for bad in ("{", "[]", '{"loopdevices": 3}', '{"loopdevices": [{"name": "/etc/passwd"}]}'):
        with pytest.raises(images.ImageError):
            images._parse_loop_list(bad)


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.text(max_size=60), st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.sampled_from(["loopdevices", "name", "dio"]), inner),
    max_leaves=8,
).map(json.dumps)))
def test_random_losetup_output_raises_only_image_errors(text: str) -> None:
    try:
        images._parse_loop_list(text)
    except images.ImageError:
        pass


def test_mountinfo_escapes_are_undone() -> None:
    assert images._unescape(r"/tmp/a\040b\011c\134d") == "/tmp/a b\tc\\d"
