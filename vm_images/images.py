"""Image files and the loop devices over them.

Two kinds of image back the project's storage:

* a **raw** image, sparse, that the VSIC device host drives through a loop device with
  direct I/O (``O_DIRECT`` on the backing file, so the page cache does not sit between a
  VSA write and the disk, and a flush means what it says);
* an **ext4** image, loop-mounted, that holds the Linux baseline's files.

Every function here is idempotent and keeps no state of its own: the truth is the file
system, ``losetup`` and ``/proc/self/mountinfo``. Commands run with argument lists, never
through a shell, and a failed command raises :class:`ImageError` carrying its stderr.

Where the backing file system refuses ``O_DIRECT`` (tmpfs before Linux 6.6, some FUSE file
systems) ``attach`` falls back to a buffered loop device; :class:`LoopDevice` says which
one the caller got, so nobody measures the page cache by mistake.
"""

from __future__ import annotations

import json
import os
import re
import stat
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

DEFAULT_IMAGE_DIR = Path("/var/lib/arrakis/images")
DEFAULT_RAW_SIZE = 1 << 30
IMAGE_SUFFIX = ".img"

# Image sizes are whole 4 KiB blocks: the registry's block size, and a size every loop
# device sector size (512..4096) divides.
SIZE_ALIGNMENT = 4096

# ext2/3/4 superblock: 1024 bytes into the device; s_magic (0xEF53, little-endian) sits at
# offset 0x38 inside it (ext4 disk layout, "The Super Block").
_EXT4_MAGIC_OFFSET = 1024 + 0x38
_EXT4_MAGIC = b"\x53\xef"

_COMMAND_TIMEOUT = 120.0

ImageKind = Literal["raw", "ext4"]


class ImageError(Exception):
    """An image operation failed; ``stderr`` is the failing command's error output, if any."""

    def __init__(self, message: str, stderr: str = "") -> None:
        self.stderr = stderr.strip()
        super().__init__(f"{message}: {self.stderr}" if self.stderr else message)


@dataclass(frozen=True)
class LoopDevice:
    device: str  # "/dev/loopN"
    direct_io: bool  # False: the fallback, I/O goes through the page cache
    read_only: bool


@dataclass(frozen=True)
class ImageInfo:
    path: Path
    size_bytes: int  # apparent size
    allocated_bytes: int  # what the sparse file really uses on disk
    kind: ImageKind
    loops: tuple[LoopDevice, ...]
    mountpoint: str | None  # where one of its loop devices is mounted, if anywhere

    @property
    def loop_devices(self) -> tuple[str, ...]:
        return tuple(loop.device for loop in self.loops)

    @property
    def direct_io(self) -> bool:
        """True when the image is attached and every loop device over it does direct I/O."""
        return bool(self.loops) and all(loop.direct_io for loop in self.loops)


def _run(argv: Sequence[str]) -> subprocess.CompletedProcess[str]:
    """Run one command; a missing binary or a timeout is an ImageError like a failure."""
    try:
        return subprocess.run(
            list(argv), capture_output=True, text=True, timeout=_COMMAND_TIMEOUT, check=False
        )
    except FileNotFoundError as exc:
        raise ImageError(f"{argv[0]} is not installed") from exc
    except subprocess.TimeoutExpired as exc:
        raise ImageError(f"{' '.join(argv)} did not finish in {_COMMAND_TIMEOUT:.0f} s") from exc


def _check(argv: Sequence[str], what: str) -> str:
    result = _run(argv)
    if result.returncode != 0:
        raise ImageError(f"{what} failed ({' '.join(argv)}, exit {result.returncode})", result.stderr)
    return result.stdout


def _check_size(size_bytes: int) -> None:
    if isinstance(size_bytes, bool) or not isinstance(size_bytes, int):
        raise ImageError(f"image size must be an integer, not {type(size_bytes).__name__}")
    if size_bytes <= 0 or size_bytes % SIZE_ALIGNMENT:
        raise ImageError(f"image size {size_bytes} must be a positive multiple of {SIZE_ALIGNMENT}")


def _regular_file_size(path: Path) -> int | None:
    """The size of ``path``, None when it does not exist, ImageError when it is not a file."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise ImageError(f"cannot stat {path}: {exc.strerror}") from exc
    if not stat.S_ISREG(st.st_mode):
        raise ImageError(f"{path} exists and is not a regular file")
    return st.st_size


def detect_kind(path: str | os.PathLike[str]) -> ImageKind:
    """``ext4`` when the file carries an ext2/3/4 superblock magic, otherwise ``raw``.

    A raw image holds whatever its VSAs wrote, so a VSA that writes the magic at byte 1080
    makes its image look like ext4 here; that only changes what ``list`` prints.
    """
    try:
        with open(path, "rb") as image:
            image.seek(_EXT4_MAGIC_OFFSET)
            magic = image.read(len(_EXT4_MAGIC))
    except OSError as exc:
        raise ImageError(f"cannot read {path}: {exc.strerror}") from exc
    return "ext4" if magic == _EXT4_MAGIC else "raw"


def create_raw(path: str | os.PathLike[str], size_bytes: int = DEFAULT_RAW_SIZE, *, resize: bool = False) -> Path:
    """Create a sparse raw image of ``size_bytes``; keep one that already has that size.

    An existing image of another size is an error unless ``resize`` is set; then the file is
    truncated to the new size (shrinking drops the tail's data) and every loop device over
    it is told the new capacity.
    """
    _check_size(size_bytes)
    image = Path(path).absolute()
    current = _regular_file_size(image)
    if current == size_bytes:
        return image
    if current is not None and not resize:
        raise ImageError(f"{image} exists with size {current}, not {size_bytes} (resize=True to change it)")
    image.parent.mkdir(parents=True, exist_ok=True)
    try:
        # truncate() makes a hole, not zeros on disk: a 1 GiB image costs no space until
        # a VSA writes to it.
        with open(image, "ab") as handle:
            handle.truncate(size_bytes)
    except OSError as exc:
        raise ImageError(f"cannot create {image}: {exc.strerror}") from exc
    if current is not None:
        for loop in loop_devices(image):
            _check(["losetup", "--set-capacity", loop.device], f"updating the capacity of {loop.device}")
    return image


def create_ext4(path: str | os.PathLike[str], size_bytes: int) -> Path:
    """Create an ext4 image of ``size_bytes``; keep an existing ext4 image as it is.

    A file that exists and is not ext4 is never overwritten (it may be someone's raw image).
    """
    _check_size(size_bytes)
    image = Path(path).absolute()
    current = _regular_file_size(image)
    if current is not None:
        if detect_kind(image) != "ext4":
            raise ImageError(f"{image} exists and is not an ext4 image; refusing to format it")
        return image
    image.parent.mkdir(parents=True, exist_ok=True)
    try:
        with open(image, "xb") as handle:
            handle.truncate(size_bytes)
    except OSError as exc:
        raise ImageError(f"cannot create {image}: {exc.strerror}") from exc
    try:
        # -F: mkfs asks for confirmation on a regular file otherwise; -q: no chatter.
        _check(["mkfs.ext4", "-F", "-q", str(image)], f"formatting {image}")
    except ImageError:
        # Leave nothing half-made: a retry must not find a file that is not ext4.
        image.unlink(missing_ok=True)
        raise
    return image


def _parse_loop_list(stdout: str) -> list[LoopDevice]:
    if not stdout.strip():
        return []
    try:
        document = json.loads(stdout)
    except json.JSONDecodeError as exc:
        raise ImageError(f"losetup printed something that is not JSON: {stdout[:200]!r}") from exc
    entries = document.get("loopdevices", []) if isinstance(document, dict) else None
    if not isinstance(entries, list):
        raise ImageError("losetup's JSON has no loopdevices list")
    loops = []
    for entry in entries:
        name = entry.get("name") if isinstance(entry, dict) else None
        if not isinstance(name, str) or not name.startswith("/dev/loop"):
            raise ImageError(f"losetup listed an odd device: {entry!r}")
        # util-linux prints these as JSON booleans (2.33+) or as "0"/"1" strings (older).
        loops.append(
            LoopDevice(
                device=name,
                direct_io=entry.get("dio") in (True, 1, "1"),
                read_only=entry.get("ro") in (True, 1, "1"),
            )
        )
    return sorted(loops, key=lambda loop: _loop_number(loop.device))


def _loop_number(device: str) -> int:
    digits = device.removeprefix("/dev/loop")
    return int(digits) if digits.isdigit() else -1


def loop_devices(path: str | os.PathLike[str]) -> list[LoopDevice]:
    """The loop devices backed by ``path`` (losetup matches the file's device and inode)."""
    image = Path(path).absolute()
    if _regular_file_size(image) is None:
        return []
    stdout = _check(["losetup", "--list", "--json", "--associated", str(image)], f"listing loop devices of {image}")
    return _parse_loop_list(stdout)


def attach(path: str | os.PathLike[str], direct_io: bool = True, read_only: bool = False) -> str:
    """Attach ``path`` to a free loop device and return it (``/dev/loopN``).

    Idempotent: when the file is already attached, the first such device is returned as it
    is (its direct-I/O and read-only settings are not changed). When direct I/O is refused,
    the device is attached without it; ``loop_devices``/``list_images`` report which.
    """
    image = Path(path).absolute()
    if _regular_file_size(image) is None:
        raise ImageError(f"{image} does not exist")
    existing = loop_devices(image)
    if existing:
        return existing[0].device
    base = ["losetup", "--find", "--show"]
    if read_only:
        base.append("--read-only")
    attempts = [[*base, "--direct-io=on", str(image)]] if direct_io else []
    attempts.append([*base, str(image)])
    failure: subprocess.CompletedProcess[str] | None = None
    for argv in attempts:
        result = _run(argv)
        device = result.stdout.strip()
        if result.returncode == 0 and device.startswith("/dev/loop"):
            return device
        failure = result
        # A failed direct-I/O attempt may still have left a device behind (util-linux sets
        # the flag after binding the file on kernels without LOOP_CONFIGURE).
        for leftover in loop_devices(image):
            _run(["losetup", "--detach", leftover.device])
    stderr = failure.stderr if failure is not None else ""
    raise ImageError(f"cannot attach {image} to a loop device", stderr)


def _mounted_sources() -> dict[str, str]:
    """Mount point -> source, from this process's mount namespace."""
    mounts: dict[str, str] = {}
    try:
        with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as table:
            lines = table.read().splitlines()
    except OSError as exc:
        raise ImageError(f"cannot read /proc/self/mountinfo: {exc.strerror}") from exc
    for line in lines:
        # proc(5): "36 35 98:0 /mnt1 /mnt2 rw,noatime master:1 - ext3 /dev/root rw"; the
        # optional fields end at " - ", and the kernel escapes blanks as \040 and so on.
        head, sep, tail = line.partition(" - ")
        fields = head.split()
        rest = tail.split()
        if not sep or len(fields) < 5 or len(rest) < 2:
            continue
        mounts[_unescape(fields[4])] = _unescape(rest[1])
    return mounts


def _unescape(text: str) -> str:
    return re.sub(r"\\([0-7]{3})", lambda match: chr(int(match.group(1), 8)), text)


def _mountpoints_of(device: str, mounts: dict[str, str]) -> list[str]:
    return sorted(point for point, source in mounts.items() if source == device)


def detach(path: str | os.PathLike[str]) -> list[str]:
    """Detach every loop device backed by ``path``; return them. Nothing attached: no error.

    A loop device that is still mounted is not detached (the kernel would only mark it
    auto-clear and it would outlive the call): that is an ImageError naming the mount.
    """
    loops = loop_devices(path)
    mounts = _mounted_sources()
    for loop in loops:
        busy = _mountpoints_of(loop.device, mounts)
        if busy:
            raise ImageError(f"{loop.device} ({path}) is mounted at {', '.join(busy)}; umount it first")
    for loop in loops:
        result = _run(["losetup", "--detach", loop.device])
        # Someone else may have detached it between our listing and now: that is success.
        if result.returncode != 0 and any(still.device == loop.device for still in loop_devices(path)):
            raise ImageError(f"cannot detach {loop.device}", result.stderr)
    return [loop.device for loop in loops]


def mount(source: str | os.PathLike[str], mountpoint: str | os.PathLike[str]) -> str:
    """Mount an ext4 image (a file, attached first, or a loop device) at ``mountpoint``.

    Idempotent: when that device is already mounted there, nothing happens. Returns the
    loop device. The file system type is pinned to ext4 and mounted nodev,nosuid: a
    file system image is data, never a way to smuggle in device nodes or setuid binaries.
    """
    source_path = Path(source)
    if str(source).startswith("/dev/loop"):
        device = str(source)
    elif _regular_file_size(source_path.absolute()) is not None:
        if detect_kind(source_path) != "ext4":
            raise ImageError(f"{source} is not an ext4 image")
        device = attach(source_path)
    else:
        raise ImageError(f"{source} is neither an image file nor a loop device")
    point = Path(os.path.realpath(mountpoint))
    mounts = _mounted_sources()
    if str(point) in mounts:
        if mounts[str(point)] == device:
            return device
        raise ImageError(f"{point} already has {mounts[str(point)]} mounted on it")
    try:
        point.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ImageError(f"cannot create mount point {point}: {exc.strerror}") from exc
    _check(["mount", "-t", "ext4", "-o", "nodev,nosuid", device, str(point)], f"mounting {device} at {point}")
    return device


def umount(mountpoint: str | os.PathLike[str], *, detach_loop: bool = True) -> str | None:
    """Unmount ``mountpoint`` if something is mounted there; return what was mounted.

    With ``detach_loop`` a loop device that was under the mount is detached too, so
    ``mount(file)`` followed by ``umount`` leaves nothing attached.
    """
    point = os.path.realpath(mountpoint)
    source = _mounted_sources().get(point)
    if source is None:
        return None
    _check(["umount", point], f"unmounting {point}")
    if detach_loop and source.startswith("/dev/loop") and source not in _mounted_sources().values():
        result = _run(["losetup", "--detach", source])
        if result.returncode != 0 and "No such device" not in result.stderr:
            raise ImageError(f"cannot detach {source} after unmounting {point}", result.stderr)
    return source


def image_info(path: str | os.PathLike[str]) -> ImageInfo:
    image = Path(path).absolute()
    try:
        st = os.stat(image)
    except OSError as exc:
        raise ImageError(f"cannot stat {image}: {exc.strerror}") from exc
    if not stat.S_ISREG(st.st_mode):
        raise ImageError(f"{image} is not a regular file")
    loops = tuple(loop_devices(image))
    mounts = _mounted_sources()
    mountpoint = next((point for loop in loops for point in _mountpoints_of(loop.device, mounts)), None)
    return ImageInfo(
        path=image,
        size_bytes=st.st_size,
        allocated_bytes=st.st_blocks * 512,  # st_blocks counts 512-byte units (stat(2))
        kind=detect_kind(image),
        loops=loops,
        mountpoint=mountpoint,
    )


def list_images(directory: str | os.PathLike[str] = DEFAULT_IMAGE_DIR) -> list[ImageInfo]:
    """Every ``*.img`` regular file in ``directory``, sorted by name; none if it is missing."""
    folder = Path(directory)
    if not folder.is_dir():
        return []
    infos = []
    for entry in sorted(folder.iterdir()):
        if entry.suffix == IMAGE_SUFFIX and entry.is_file() and not entry.is_symlink():
            infos.append(image_info(entry))
    return infos
