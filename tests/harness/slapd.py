"""A private OpenLDAP slapd (Debian's /usr/sbin/slapd) on a loopback port, for the console's
LDAP login tests: a slapd.conf in a temp dir (mdb database, the memberof overlay), started in
the foreground, loaded over LDAP as the rootdn (so the overlay fills memberOf).

The test directory under dc=example,dc=jp:
  ou=people: alice (admins), audrey (auditors), bob (no group; two mail addresses),
             carol (both admins and auditors); uid=admin,ou=x under it (an admin that
             only the unescaped name "admin,ou=x" reaches); cn=reader (the search account)
  ou=groups: cn=admins, cn=auditors, cn=sales (bob) (groupOfNames)
  managers (review approvers: [manager]): bob's is alice; carol's is uid=admin,ou=x (no
  mail); alice and audrey have none
Every person's password is PASSWORDS[uid].
"""
from __future__ import annotations

import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

from ldap3 import Connection, Server

from tests.harness.ports import LOOPBACK, free_port, port_is_open

SLAPD = "/usr/sbin/slapd"
SCHEMA = Path("/etc/ldap/schema")
MODULES = Path("/usr/lib/ldap")
SUFFIX = "dc=example,dc=jp"
ROOT_DN, ROOT_PW = f"cn=root,{SUFFIX}", "root-secret-pw"
PEOPLE, GROUPS = f"ou=people,{SUFFIX}", f"ou=groups,{SUFFIX}"
READER_DN, READER_PW = f"cn=reader,{SUFFIX}", "reader-pw"
ADMINS, AUDITORS = f"cn=admins,{GROUPS}", f"cn=auditors,{GROUPS}"
SALES = f"cn=sales,{GROUPS}"
TRAP_DN, TRAP_PW = f"uid=admin,ou=x,{PEOPLE}", "trap-pw"
PASSWORDS = {"alice": "alice-pw", "audrey": "audrey-pw", "bob": "bob-pw", "carol": "carol-pw"}
MAIL = {"alice": ["alice@example.jp"], "audrey": ["audrey@example.jp"],
        "bob": ["bob@example.jp", "Bob.Sales@Example.JP"], "carol": ["carol@example.jp"]}
TRAP_DN_ = f"uid=admin,ou=x,ou=people,{SUFFIX}"
MANAGER = {"bob": f"uid=alice,ou=people,{SUFFIX}", "carol": TRAP_DN_}


def person_dn(uid: str) -> str:
    return f"uid={uid},{PEOPLE}"


class Slapd:
    def __init__(self, start_timeout: float = 15.0) -> None:
        self.start_timeout = start_timeout
        self.port = 0
        self.dir: Path | None = None
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"ldap://{LOOPBACK}:{self.port}"

    def start(self) -> "Slapd":
        self.dir = Path(tempfile.mkdtemp(prefix="mailmoat-slapd-"))
        (self.dir / "db").mkdir()
        conf = self.dir / "slapd.conf"
        conf.write_text("\n".join([
            *(f"include {SCHEMA / name}.schema" for name in ("core", "cosine", "inetorgperson")),
            f"modulepath {MODULES}", "moduleload back_mdb", "moduleload memberof",
            f"pidfile {self.dir / 'slapd.pid'}",
            "database mdb", f'suffix "{SUFFIX}"', f'rootdn "{ROOT_DN}"', f"rootpw {ROOT_PW}",
            f"directory {self.dir / 'db'}", "maxsize 10485760",
            "overlay memberof",
            # People read their own entry; the reader reads everyone; nobody reads passwords.
            "access to attrs=userPassword by anonymous auth by * none",
            "access to * by self read by dn.exact=\"" + READER_DN + "\" read "
            "by anonymous auth by users read",
            "",
        ]))
        for _ in range(5):
            self.port = free_port()
            if self._launch(conf):
                self._load()
                return self
        self.stop()
        raise RuntimeError(f"slapd did not start; log:\n{self.log()}")

    def _launch(self, conf: Path) -> bool:
        assert self.dir is not None
        with open(self.dir / "slapd.log", "ab") as log:
            # -d 0: stay in the foreground (we own the process), log nothing extra.
            self.proc = subprocess.Popen(
                [SLAPD, "-f", str(conf), "-h", self.url + "/", "-d", "0"],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return False
            if port_is_open(LOOPBACK, self.port, timeout=0.2):
                return True
            time.sleep(0.05)
        self._end()
        return False

    def root(self) -> Connection:
        return Connection(Server(self.url, connect_timeout=5), ROOT_DN, ROOT_PW,
                          auto_bind=True, receive_timeout=5)

    def _load(self) -> None:
        conn = self.root()
        try:
            adds: list[tuple[str, list[str], dict]] = [
                (SUFFIX, ["dcObject", "organization"], {"dc": "example", "o": "Example"}),
                (PEOPLE, ["organizationalUnit"], {"ou": "people"}),
                (GROUPS, ["organizationalUnit"], {"ou": "groups"}),
                (READER_DN, ["person"], {"cn": "reader", "sn": "reader",
                                         "userPassword": READER_PW}),
            ]
            for uid, password in PASSWORDS.items():
                adds.append((person_dn(uid), ["inetOrgPerson"],
                             {"uid": uid, "cn": uid, "sn": uid, "userPassword": password,
                              "mail": MAIL[uid],
                              **({"manager": MANAGER[uid]} if uid in MANAGER else {})}))
            # An entry only an unescaped name can reach: "admin,ou=x" as uid={name},ou=people
            adds += [(f"ou=x,{PEOPLE}", ["organizationalUnit"], {"ou": "x"}),
                     (TRAP_DN, ["inetOrgPerson"], {"uid": "admin", "cn": "admin", "sn": "admin",
                                                   "userPassword": TRAP_PW})]
            adds += [
                (ADMINS, ["groupOfNames"], {"cn": "admins", "member": [
                    person_dn("alice"), person_dn("carol"), TRAP_DN]}),
                (AUDITORS, ["groupOfNames"], {"cn": "auditors", "member": [
                    person_dn("audrey"), person_dn("carol")]}),
                (SALES, ["groupOfNames"], {"cn": "sales", "member": [person_dn("bob")]}),
            ]
            for dn, classes, attributes in adds:
                if not conn.add(dn, classes, attributes):
                    raise RuntimeError(f"slapd: cannot add {dn}: {conn.result}")
        finally:
            conn.unbind()

    def pause(self) -> None:
        """SIGSTOP: the port still accepts connections, nothing answers (a hung server)."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)

    def log(self) -> str:
        try:
            return (self.dir / "slapd.log").read_text(errors="replace")[-4000:] if self.dir else ""
        except OSError:
            return ""

    def _end(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGCONT)  # a paused slapd cannot handle SIGTERM
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)

    def stop(self) -> None:
        self._end()
        if self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir = None

    def __enter__(self) -> "Slapd":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()



