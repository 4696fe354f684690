"""The OpenFlow channel's TLS: kernelctl is its own certificate authority.

``kernelctl up --openflow-tls PORT`` makes, under ``/run/arrakis/<instance>/openflow-tls/``
(mode 0700, root only): a CA key and certificate, a server certificate for 127.0.0.1, and
one client certificate with its key for controllers (``controller.pem``, ``controller.key``).
The listener requires a client certificate signed by that CA, so only someone who could
read root's directory (root, or whoever root hands the files to) can connect; that is the
"secure channel" of OpenFlow 1.3, 6.3.3. The keys are made with the ``openssl`` command
(Python's ``ssl`` module can use certificates but not make them), EC P-256, valid 30 days;
they are made again whenever the directory lacks them.
"""

from __future__ import annotations

import os
import ssl
import subprocess
from pathlib import Path

_DAYS = "30"
_CURVE = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1"]


def _openssl(*args: str, cwd: Path) -> None:
    result = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True, timeout=60)
    if result.returncode != 0:
        raise RuntimeError(f"openssl {args[0]} failed: {result.stderr.strip()[-400:]}")


def make_certificates(directory: Path) -> None:
    """CA, server and controller certificates in ``directory`` (made if missing)."""
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(directory, 0o700)
    if all((directory / name).exists() for name in ("ca.pem", "server.pem", "server.key", "controller.pem", "controller.key")):
        return
    _openssl("req", "-x509", *_CURVE, "-nodes", "-keyout", "ca.key", "-out", "ca.pem", "-days", _DAYS,
             "-subj", "/CN=arrakis kernelctl OpenFlow CA", cwd=directory)
    for name, extension in (("server", "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth"),
                            ("controller", "extendedKeyUsage=clientAuth")):
        (directory / f"{name}.ext").write_text(extension + "\n")
        _openssl("req", *_CURVE, "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr",
                 "-subj", f"/CN=arrakis OpenFlow {name}", cwd=directory)
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
                 "-out", f"{name}.pem", "-days", _DAYS, "-extfile", f"{name}.ext", cwd=directory)
    for leftover in ("server.csr", "server.ext", "controller.csr", "controller.ext", "ca.srl"):
        (directory / leftover).unlink(missing_ok=True)
    for path in directory.iterdir():
        os.chmod(path, 0o600)


def server_context(directory: Path) -> ssl.SSLContext:
    make_certificates(directory)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(directory / "server.pem", directory / "server.key")
    context.load_verify_locations(directory / "ca.pem")
    context.verify_mode = ssl.CERT_REQUIRED  # a controller without our certificate never gets in
    return context


def client_context(directory: Path) -> ssl.SSLContext:
    """For controllers written in Python (tools/, tests)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.load_cert_chain(directory / "controller.pem", directory / "controller.key")
    context.load_verify_locations(directory / "ca.pem")
    return context
