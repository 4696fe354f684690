"""Serve a directory of one's own files under ``/apps/NAME`` in kernelctl's name tree.

    python -m libos.apps.fileshare --name share DIR [--mode 644] [--instance TAG]

Every regular file below DIR becomes a served name (read live with ``pread``, so a file
that grows is seen growing), every directory a directory name. It prints
``fileshare: ready names=N`` once kernelctl holds the names, and stops (withdrawing them)
on SIGTERM or SIGINT. Tests and the demo use it as the simplest file server.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from pathlib import Path

from libos.files import FileServer, LocalFile, ServerError, Source


def tree_names(root: Path, base: str, mode: int, dir_mode: int) -> list[tuple[str, Source | None, int]]:
    names: list[tuple[str, Source | None, int]] = [(base, None, dir_mode)]
    for directory, subdirs, files in os.walk(root):
        subdirs.sort()
        relative = Path(directory).relative_to(root)
        prefix = base if str(relative) == "." else f"{base}/{relative.as_posix()}"
        names += [(f"{prefix}/{sub}", None, dir_mode) for sub in subdirs]
        names += [(f"{prefix}/{name}", LocalFile(Path(directory) / name, mode), mode) for name in sorted(files)]
    return names


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m libos.apps.fileshare", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("directory", type=Path)
    parser.add_argument("--name", required=True, help="served as /apps/NAME")
    parser.add_argument("--mode", default="644", help="octal mode of the files' names")
    parser.add_argument("--dir-mode", default="755", help="octal mode of the directories' names")
    parser.add_argument("--instance", default="")
    args = parser.parse_args(argv)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    names = tree_names(args.directory, f"/apps/{args.name}", int(args.mode, 8), int(args.dir_mode, 8))
    server = FileServer(args.instance)
    try:
        server.start(names)
    except (ServerError, ValueError, OSError) as exc:
        print(f"fileshare: {exc}", file=sys.stderr)
        return 1
    print(f"fileshare: ready names={len(names)}", flush=True)
    while not stop.wait(1.0):
        pass
    server.stop()
    print(f"fileshare: stats {server.stats()}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
