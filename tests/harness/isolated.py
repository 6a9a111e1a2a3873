"""Run a daemon that only knows the system resolver against a test DNS server.

    argv = isolated_argv(["/usr/sbin/opendmarc", "-f", "-c", conf], knot.address, tmp_path)
    subprocess.Popen(argv)   # its /etc/resolv.conf says "nameserver <knot.address>"

OpenDMARC (and anything using glibc's resolver) has no nameserver option, and
resolv.conf cannot name a port: the test server must be on port 53 of its own
address, and the daemon must see a resolv.conf naming it. The command runs in
a private mount namespace (`unshare --mount`, propagation private) where our
file is bind-mounted over /etc/resolv.conf; the host's file and every other
process are untouched, and the mount disappears with the namespace's last
process. Needs root (CAP_SYS_ADMIN), which the integration tests have.

unshare and `sh -c '... exec "$@"'` both exec, so the pid Popen returns is the
daemon's own: terminate() reaches it directly.
"""
from __future__ import annotations

import ipaddress
import os
from collections.abc import Sequence
from pathlib import Path

UNSHARE = "/usr/bin/unshare"
RESOLV_CONF = "/etc/resolv.conf"

# $1 is our resolv.conf, the rest is the command; `exec` keeps the pid.
_BIND_AND_EXEC = f'mount --bind "$1" {RESOLV_CONF} && shift && exec "$@"'


def _nameserver_ip(nameserver: str) -> str:
    """The IP of `nameserver` ("127.1.2.3" or "127.1.2.3:53"); glibc only talks to port 53."""
    try:
        return str(ipaddress.ip_address(nameserver))
    except ValueError:
        pass
    host, _, port = nameserver.rpartition(":")
    try:
        ip = str(ipaddress.ip_address(host.strip("[]")))
    except ValueError:
        raise ValueError(f"not an IP address: {nameserver!r}") from None
    if port != "53":
        raise ValueError(f"resolv.conf cannot name a port; {nameserver!r} must use port 53")
    return ip


def write_resolv_conf(nameserver: str, workdir: Path) -> Path:
    """workdir/resolv.conf naming only `nameserver`, with short timeouts for tests."""
    path = Path(workdir) / "resolv.conf"
    path.write_text(f"# Written by tests/harness/isolated.py\n"
                    f"nameserver {_nameserver_ip(nameserver)}\n"
                    f"options timeout:2 attempts:1\n")
    # A daemon that dropped privileges must still read it through the bind mount.
    os.chmod(path, 0o644)
    return path


def isolated_argv(argv: Sequence[str], nameserver_ip: str, workdir: Path) -> list[str]:
    """`argv` wrapped so that it sees a resolv.conf naming only `nameserver_ip`."""
    if not argv:
        raise ValueError("empty argv")
    resolv = write_resolv_conf(nameserver_ip, workdir)
    return [UNSHARE, "--mount", "--propagation", "private",
            "sh", "-c", _BIND_AND_EXEC, "sh", str(resolv), *argv]
