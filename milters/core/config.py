"""The gateway config file (`--config`): where state and the queue live, which policy applies.

With no --config, the embedded defaults of DESIGN.md section 4 apply: SQLite state in
./var/state.db, the spool in ./var/spool and the policy policies/default.yaml. Relative paths in a config file are
relative to that file's directory, so a config works whatever the current directory is.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .policy.schema import Duration, Field, ListOf, Str, Struct
from .policy.yamlnodes import Problems, compose_file

PROJECT_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_POLICY = Path("policies/default.yaml")
DEFAULT_STORE = "sqlite:///./var/state.db"


DEFAULT_SPOOL = Path("var/spool")
DEFAULT_RETRY = (60.0, 300.0, 900.0, 1800.0, 3600.0)


@dataclass(frozen=True)
class QueueSettings:
    dir: Path = DEFAULT_SPOOL
    max_age: float = 5 * 86400.0  # then the message bounces
    retry: tuple[float, ...] = DEFAULT_RETRY  # waits between attempts; the last one repeats


@dataclass(frozen=True)
class GatewayConfig:
    hostname: str
    store: str
    store_timeout: float
    policy: Path
    source: str  # the file it came from, or "(embedded defaults)"
    queue: QueueSettings = QueueSettings()


def default_policy_path() -> Path:
    """policies/default.yaml in the current directory, else the one shipped with mailmoat."""
    return DEFAULT_POLICY if DEFAULT_POLICY.exists() else PROJECT_ROOT / DEFAULT_POLICY


def _spec(base: Path) -> Struct:
    def build(gateway: dict, store: str, store_timeout: float, policy: str) -> GatewayConfig:
        if not store.startswith(("memory:", "sqlite:", "redis:", "rediss:")):
            raise ValueError("store must be memory://, sqlite:///PATH or redis://HOST:PORT/DB")
        if store.startswith("sqlite:///") and not store.startswith("sqlite:////"):
            store = "sqlite:///" + str((base / store[len("sqlite:///"):]).resolve())
        queue = gateway["queue"]
        return GatewayConfig(hostname=gateway["hostname"], store=store,
                             store_timeout=store_timeout, policy=(base / policy),
                             source="", queue=QueueSettings(base / queue["dir"], queue["max_age"],
                                                            tuple(queue["retry"])))
    queue = Struct({
        "dir": Field(Str(), str(DEFAULT_SPOOL)),
        "max_age": Field(Duration(minimum=60), 5 * 86400.0),
        "retry": Field(ListOf(Duration(minimum=1), min_items=1), DEFAULT_RETRY),
    })
    default_queue = {"dir": str(DEFAULT_SPOOL), "max_age": 5 * 86400.0, "retry": DEFAULT_RETRY}
    gateway = Struct({"hostname": Field(Str(max_len=253), "localhost"),
                      "queue": Field(queue, factory=lambda: dict(default_queue))})
    return Struct({
        "gateway": Field(gateway, factory=lambda: {"hostname": "localhost",
                                                   "queue": dict(default_queue)}),
        "store": Field(Str(), DEFAULT_STORE),
        "store_timeout": Field(Duration(minimum=0.05), 2.0),
        "policy": Field(Str(), str(DEFAULT_POLICY)),
    }, build=build, expected="a mailmoat config mapping")


def load_config(path: str | Path | None) -> GatewayConfig:
    """Load --config FILE, or return the embedded defaults when path is None."""
    if path is None:
        return GatewayConfig(hostname="localhost", store=DEFAULT_STORE, store_timeout=2.0,
                             policy=default_policy_path(), source="(embedded defaults)")
    path = Path(path)
    problems = Problems(str(path))
    config = _spec(path.parent).read(compose_file(path), "", problems)
    problems.raise_if_any()
    return GatewayConfig(config.hostname, config.store, config.store_timeout, config.policy,
                         str(path), config.queue)
