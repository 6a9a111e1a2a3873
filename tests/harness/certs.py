"""Certificates made by the tests with the real openssl: a private CA and server
certificates it signs, for loopback TLS (outbound STARTTLS with `verify`).

    ca = TestCa(tmp_path)
    cert, key = ca.issue("good", "IP:127.0.0.1")
    context = server_context(cert, key)
"""
from __future__ import annotations

import ssl
import subprocess
from pathlib import Path

KEY = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=30)


class TestCa:
    """A CA whose certificate is `self.cert` (the ca_file a route trusts)."""

    __test__ = False  # not a pytest class

    def __init__(self, directory: Path, name: str = "ca") -> None:
        self.dir = directory
        self.cert, self.key = directory / f"{name}.pem", directory / f"{name}.key"
        _openssl("req", "-x509", *KEY, "-days", "2", "-subj", f"/CN=mailmoat test {name}",
                 "-keyout", str(self.key), "-out", str(self.cert),
                 "-addext", "basicConstraints=critical,CA:TRUE",
                 "-addext", "keyUsage=critical,keyCertSign,cRLSign")

    def issue(self, name: str, subject_alt_names: str) -> tuple[Path, Path]:
        """A server certificate for `subject_alt_names` ("IP:127.0.0.1", "DNS:x.test")."""
        cert, key = self.dir / f"{name}.pem", self.dir / f"{name}.key"
        request, extensions = self.dir / f"{name}.csr", self.dir / f"{name}.ext"
        extensions.write_text(
            f"subjectAltName={subject_alt_names}\nbasicConstraints=CA:FALSE\n"
            "keyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\n"
            "subjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid\n")
        _openssl("req", *KEY, "-subj", f"/CN={name}", "-keyout", str(key), "-out", str(request))
        _openssl("x509", "-req", "-in", str(request), "-CA", str(self.cert), "-CAkey",
                 str(self.key), "-CAcreateserial", "-days", "2", "-extfile", str(extensions),
                 "-out", str(cert))
        return cert, key


def server_context(cert: Path, key: Path) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(str(cert), str(key))
    return context
