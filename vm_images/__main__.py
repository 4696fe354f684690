"""``python -m vm_images``: create, attach, detach, mount and list the project's images.

    create NAME --size 1G [--kind raw|ext4] [--resize]
    attach NAME [--no-direct-io] [--read-only]     prints the loop device
    detach NAME
    mount NAME MOUNTPOINT                           ext4 images only
    umount MOUNTPOINT
    list [-j]

Every command takes ``--dir DIR`` (default ``$ARRAKIS_IMAGE_DIR`` or /var/lib/arrakis/images);
NAME is the file ``DIR/NAME.img``. Exit status: 0 done, 1 the operation failed, 2 bad usage.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path

from vm_images import images

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2

_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,63}")
_SIZE = re.compile(r"([0-9]+)\s*([KMGT]?)(?:i?B)?", re.IGNORECASE)
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


class UsageError(Exception):
    pass


def parse_size(text: str) -> int:
    """``"1G"``, ``"512M"``, ``"64KiB"``, ``"4096"``: binary units, a multiple of 4 KiB."""
    match = _SIZE.fullmatch(text.strip())
    if match is None:
        raise UsageError(f"bad size {text!r} (try 1G, 512M or a number of bytes)")
    size = int(match.group(1)) * _UNITS[match.group(2).upper()]
    if size <= 0 or size % images.SIZE_ALIGNMENT:
        raise UsageError(f"size {text!r} must be a positive multiple of {images.SIZE_ALIGNMENT} bytes")
    return size


def image_path(directory: Path, name: str) -> Path:
    """``DIR/NAME.img``; names are plain file names, so none can walk out of DIR."""
    stem = name.removesuffix(images.IMAGE_SUFFIX)
    if _NAME.fullmatch(stem) is None:
        raise UsageError(f"bad image name {name!r}: 1-64 characters of A-Z a-z 0-9 . _ -, not starting with '.'")
    return directory / f"{stem}{images.IMAGE_SUFFIX}"


def _human(size: int) -> str:
    for unit, scale in (("T", 1 << 40), ("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)):
        if size >= scale:
            return f"{size / scale:.1f}{unit}"
    return str(size)


def _info_json(info: images.ImageInfo) -> dict[str, object]:
    return {
        "name": info.path.name.removesuffix(images.IMAGE_SUFFIX),
        "path": str(info.path),
        "size_bytes": info.size_bytes,
        "allocated_bytes": info.allocated_bytes,
        "kind": info.kind,
        "loop_devices": [
            {"device": loop.device, "direct_io": loop.direct_io, "read_only": loop.read_only} for loop in info.loops
        ],
        "mountpoint": info.mountpoint,
    }


def render_table(infos: list[images.ImageInfo]) -> str:
    headers = ["NAME", "KIND", "SIZE", "USED", "LOOP", "DIO", "MOUNTPOINT"]
    rows = [
        [
            info.path.name.removesuffix(images.IMAGE_SUFFIX),
            info.kind,
            _human(info.size_bytes),
            _human(info.allocated_bytes),
            ",".join(info.loop_devices) or "-",
            ("on" if info.direct_io else "off") if info.loops else "-",
            info.mountpoint or "-",
        ]
        for info in infos
    ]
    widths = [max(len(str(cell)) for cell in column) for column in zip(headers, *rows)]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in [headers, *rows])


def _build_parser() -> argparse.ArgumentParser:
    default_dir = Path(os.environ.get("ARRAKIS_IMAGE_DIR", str(images.DEFAULT_IMAGE_DIR)))
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--dir", type=Path, default=default_dir, help=f"image directory (default {default_dir})")
    parser = argparse.ArgumentParser(prog="python -m vm_images", description="Manage the project's image files.")
    commands = parser.add_subparsers(dest="command", required=True)
    create = commands.add_parser("create", parents=[common], help="create an image (idempotent)")
    create.add_argument("name")
    create.add_argument("--size", required=True, help="e.g. 1G, 512M")
    create.add_argument("--kind", choices=["raw", "ext4"], default="raw")
    create.add_argument("--resize", action="store_true", help="raw: change the size of an existing image")
    attach = commands.add_parser("attach", parents=[common], help="attach to a loop device, print it")
    attach.add_argument("name")
    attach.add_argument("--no-direct-io", action="store_true")
    attach.add_argument("--read-only", action="store_true")
    detach = commands.add_parser("detach", parents=[common], help="detach every loop device of an image")
    detach.add_argument("name")
    mount = commands.add_parser("mount", parents=[common], help="loop-mount an ext4 image")
    mount.add_argument("name")
    mount.add_argument("mountpoint", type=Path)
    umount = commands.add_parser("umount", parents=[common], help="unmount and detach its loop device")
    umount.add_argument("mountpoint", type=Path)
    listing = commands.add_parser("list", parents=[common], help="list the images")
    listing.add_argument("-j", "--json", action="store_true")
    return parser


def _dispatch(args: argparse.Namespace) -> None:
    directory: Path = args.dir
    if args.command == "create":
        size = parse_size(args.size)
        path = image_path(directory, args.name)
        if args.kind == "raw":
            images.create_raw(path, size, resize=args.resize)
        else:
            images.create_ext4(path, size)
        print(path)
    elif args.command == "attach":
        print(images.attach(image_path(directory, args.name), direct_io=not args.no_direct_io, read_only=args.read_only))
    elif args.command == "detach":
        for device in images.detach(image_path(directory, args.name)):
            print(device)
    elif args.command == "mount":
        print(images.mount(image_path(directory, args.name), args.mountpoint))
    elif args.command == "umount":
        images.umount(args.mountpoint)
    elif args.command == "list":
        infos = images.list_images(directory)
        if args.json:
            print(json.dumps([_info_json(info) for info in infos], indent=2))
        else:
            print(render_table(infos))


def main(argv: list[str] | None = None) -> int:
    args = _build_parser().parse_args(argv)
    try:
        _dispatch(args)
    except UsageError as exc:
        print(f"vm_images: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except images.ImageError as exc:
        print(f"vm_images: {exc}", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
