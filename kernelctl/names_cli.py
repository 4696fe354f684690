"""``kernelctl ls|stat|cat|rm|mkdir``: the name tree from the command line.

    kernelctl ls [-l] [-j] PATH     the names in a directory (-l: owner, mode, kind)
    kernelctl stat [-j] PATH        one name
    kernelctl cat PATH              a served file's bytes, read through the file server RPC
    kernelctl rm PATH               remove a name (the owner, or root)
    kernelctl mkdir [-m MODE] PATH  a lasting directory

Every request goes through the control socket as the caller's own uid: kernelctl checks
access, the CLI only shows what it is given.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

from kernelctl.client import ControlClient, ControlError
from kernelctl.fileclient import FileClient, FileRpcError, open_name
from kernelctl.names import Topology
from vdev import control


def add_parsers(commands: Any) -> None:
    ls = commands.add_parser("ls", help="list names in the global name tree")
    ls.add_argument("-l", dest="long", action="store_true", help="owner, mode and kind")
    ls.add_argument("-j", "--json", action="store_true")
    ls.add_argument("path", nargs="?", default="/")
    st = commands.add_parser("stat", help="one name of the tree")
    st.add_argument("-j", "--json", action="store_true")
    st.add_argument("path")
    cat = commands.add_parser("cat", help="print a served file (through its file server)")
    cat.add_argument("path")
    rm = commands.add_parser("rm", help="remove a name")
    rm.add_argument("path")
    mkdir = commands.add_parser("mkdir", help="make a lasting directory in the tree")
    mkdir.add_argument("-m", "--mode", default="755", help="octal mode (default 755)")
    mkdir.add_argument("path")


def _long_row(entry: dict[str, Any]) -> str:
    stamp = time.strftime("%b %d %H:%M", time.localtime(float(entry.get("mtime") or 0)))
    target = f" -> {entry['target']}" if entry.get("target") else ""
    return (
        f"{entry['mode_text']} {entry['owner_uid']:>6} {entry['owner_gid']:>6} {entry['kind']:<6} "
        f"{stamp} {entry['name']}{target}"
    )


def cmd_ls(topo: Topology, args: argparse.Namespace) -> int:
    try:
        with ControlClient(topo.control_socket) as client:
            result, _ = client.call(control.NameList(path=args.path))
    except (ControlError, control.ProtocolError) as exc:
        print(f"kernelctl: ls {args.path}: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(result, indent=2, sort_keys=True))
        return 0
    for entry in result["entries"]:
        print(_long_row(entry) if args.long else entry["name"])
    return 0


def cmd_stat(topo: Topology, args: argparse.Namespace) -> int:
    try:
        with ControlClient(topo.control_socket) as client:
            result, _ = client.call(control.NameStat(path=args.path))
    except (ControlError, control.ProtocolError) as exc:
        print(f"kernelctl: stat {args.path}: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(result, indent=2, sort_keys=True))
    else:
        for key in ("path", "kind", "owner_uid", "owner_gid", "mode_text", "target", "server"):
            print(f"{key:>10}: {result[key]}")
    return 0


def cmd_cat(topo: Topology, args: argparse.Namespace) -> int:
    """Open through kernelctl (access checked there), then read from the server itself."""
    try:
        with ControlClient(topo.control_socket) as client:
            name, sock = open_name(client, args.path)
    except (ControlError, control.ProtocolError) as exc:
        print(f"kernelctl: cat {args.path}: {exc}", file=sys.stderr)
        return 1
    if sock is None:
        kind = name.get("kind")
        if kind == "store":
            # Way 2: this process maps the VSA itself. kernelctl never imports the libOS, so
            # the reader runs as a program of its own, with this uid.
            sys.stdout.flush()
            argv = [sys.executable, "-m", "libos.storage.filecat", "--instance", topo.tag, args.path]
            os.execv(sys.executable, argv)
        print(f"kernelctl: cat {args.path}: a {kind} name holds no bytes to read", file=sys.stderr)
        return 1
    out = sys.stdout.buffer
    try:
        with FileClient(sock) as files:
            handle, _attr = files.open(name["path"])
            for chunk in files.read_all(handle):
                out.write(chunk)
            files.close(handle)
        out.flush()
    except FileRpcError as exc:
        print(f"kernelctl: cat {args.path}: {os.strerror(exc.errno) if exc.errno else ''}: {exc.strerror}",
              file=sys.stderr)
        return 1
    except BrokenPipeError:
        return 0
    return 0


def cmd_rm(topo: Topology, args: argparse.Namespace) -> int:
    try:
        with ControlClient(topo.control_socket) as client:
            client.call(control.NameRemove(path=args.path))
    except (ControlError, control.ProtocolError) as exc:
        print(f"kernelctl: rm {args.path}: {exc}", file=sys.stderr)
        return 1
    return 0


def cmd_mkdir(topo: Topology, args: argparse.Namespace) -> int:
    try:
        mode = int(args.mode, 8)
        with ControlClient(topo.control_socket) as client:
            client.call(control.NameMake(path=args.path, kind="dir", mode=mode))
    except ValueError as exc:  # ProtocolError is a ValueError too
        print(f"kernelctl: mkdir {args.path}: {exc}", file=sys.stderr)
        return 2
    except ControlError as exc:
        print(f"kernelctl: mkdir {args.path}: {exc}", file=sys.stderr)
        return 1
    return 0


HANDLERS = {"ls": cmd_ls, "stat": cmd_stat, "cat": cmd_cat, "rm": cmd_rm, "mkdir": cmd_mkdir}
