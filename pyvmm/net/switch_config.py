"""switch.json: what `pyvmm switch run NAME --config switch.json` reads.

    {
      "mac_table": {"capacity": 4096, "per_port": 1024, "max_age": 300, "move_hold": 1.0},
      "max_frame": 1522,
      "groups": {"default": {"vlan": 0},
                 "red": {"vlan": 10, "rate_limit": {"bandwidth": {"size": 1000000, "refill_time": 100},
                                                    "ops": {"size": 1000, "refill_time": 1000,
                                                            "one_time_burst": 100}}}},
      "uplinks": [{"type": "tap", "ifname": "tap0"}, {"type": "packet", "ifname": "veth0"}],
      "teams": [{"name": "t0", "policy": "failover", "failback": true,
                 "beacon": {"interval": 1.0, "misses": 3},
                 "uplinks": [{"type": "packet", "ifname": "eth1"}, {"type": "packet", "ifname": "eth2"}]}]
    }

Team policies: failover (explicit order: first up member active, the rest
standby), port_id, mac_hash (see team.py). "beacon" turns on beacon
probing (true: a beacon a second, down after 3 missed); off by default.

Each group gets its own client socket (NAME.sock for "default",
NAME.GROUP.sock for the others); every port of a group gets its own token
buckets with the group's rate_limit. All of it is optional."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

from ..errors import ConfigError
from .framing import DEFAULT_MAX_FRAME, ETH_HLEN, HARD_LIMIT
from .ratelimit import RateLimiter

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,31}$")
UPLINK_TYPES = ("tap", "packet")
TEAM_POLICIES = ("failover", "port_id", "mac_hash")


@dataclass
class GroupConfig:
    name: str
    vlan: int = 0
    rate_limit: dict[str, Any] | None = None


@dataclass
class UplinkConfig:
    type: str
    ifname: str


@dataclass
class TeamConfig:
    name: str
    uplinks: list[UplinkConfig]
    policy: str = "failover"
    failback: bool = True
    beacon: tuple[float, int] | None = None     # (interval in seconds, misses); None: link state only


@dataclass
class SwitchConfig:
    capacity: int = 4096
    per_port: int = 1024
    max_age: float = 300.0
    move_hold: float = 1.0      # seconds a live station is pinned to its port (mactable.py)
    max_frame: int = DEFAULT_MAX_FRAME
    groups: dict[str, GroupConfig] = field(default_factory=lambda: {"default": GroupConfig("default")})
    uplinks: list[UplinkConfig] = field(default_factory=list)
    teams: list[TeamConfig] = field(default_factory=list)


def check_name(name: str, what: str = "switch name") -> str:
    if not NAME_RE.match(name):
        raise ConfigError(f"bad {what} {name!r} (letters, digits, '-' and '_', at most 32)")
    return name


def _int(value: Any, what: str, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise ConfigError(f"{what} must be an integer in {lo}..{hi}, not {value!r}")
    return value


def _keys(d: Any, what: str, allowed: set[str]) -> dict:
    if not isinstance(d, dict):
        raise ConfigError(f"{what} must be an object")
    extra = set(d) - allowed
    if extra:
        raise ConfigError(f"{what}: unknown key {sorted(extra)[0]!r}")
    return d


def parse_config(data: Any) -> SwitchConfig:
    """Raises ConfigError naming the first bad field."""
    d = _keys(data, "switch config", {"mac_table", "max_frame", "groups", "uplinks", "teams"})
    cfg = SwitchConfig()
    mt = _keys(d.get("mac_table", {}), "mac_table", {"capacity", "per_port", "max_age", "move_hold"})
    cfg.capacity = _int(mt.get("capacity", cfg.capacity), "mac_table.capacity", 1, 1 << 20)
    cfg.per_port = _int(mt.get("per_port", min(cfg.per_port, cfg.capacity)), "mac_table.per_port", 1, cfg.capacity)
    age = mt.get("max_age", cfg.max_age)
    if isinstance(age, bool) or not isinstance(age, (int, float)) or age <= 0:
        raise ConfigError(f"mac_table.max_age must be a positive number of seconds, not {age!r}")
    cfg.max_age = float(age)
    hold = mt.get("move_hold", cfg.move_hold)
    if isinstance(hold, bool) or not isinstance(hold, (int, float)) or not 0 <= hold <= 60:
        raise ConfigError(f"mac_table.move_hold must be 0..60 seconds, not {hold!r}")
    cfg.move_hold = float(hold)
    cfg.max_frame = _int(d.get("max_frame", cfg.max_frame), "max_frame", ETH_HLEN, HARD_LIMIT)
    if "groups" in d:
        groups = _keys(d["groups"], "groups", set(d["groups"]) if isinstance(d["groups"], dict) else set())
        cfg.groups = {}
        seen: dict[int, str] = {}
        for name, g in groups.items():
            check_name(name, "group name")
            g = _keys(g, f"group {name}", {"vlan", "rate_limit"})
            vlan = _int(g.get("vlan", 0), f"group {name}: vlan", 0, 4094)
            if vlan in seen:
                raise ConfigError(f"groups {seen[vlan]} and {name} share VLAN {vlan}")
            seen[vlan] = name
            try:
                RateLimiter.from_config(g.get("rate_limit"))
            except ValueError as e:
                raise ConfigError(f"group {name}: {e}") from None
            cfg.groups[name] = GroupConfig(name, vlan, g.get("rate_limit"))
        if not cfg.groups:
            raise ConfigError("groups is empty")
    cfg.uplinks = _uplinks(d.get("uplinks", []), "uplinks")
    teams = d.get("teams", [])
    if not isinstance(teams, list):
        raise ConfigError("teams must be a list")
    for i, t in enumerate(teams):
        t = _keys(t, f"teams[{i}]", {"name", "uplinks", "policy", "failback", "beacon"})
        name = check_name(str(t.get("name", "")), f"teams[{i}].name")
        if t.get("policy", "failover") not in TEAM_POLICIES:
            raise ConfigError(f"team {name}: policy must be one of {', '.join(TEAM_POLICIES)}")
        if not isinstance(t.get("failback", True), bool):
            raise ConfigError(f"team {name}: failback must be true or false")
        members = _uplinks(t.get("uplinks"), f"team {name}: uplinks")
        if not members:
            raise ConfigError(f"team {name} has no uplinks")
        cfg.teams.append(TeamConfig(name, members, t.get("policy", "failover"), t.get("failback", True),
                                    _beacon(t.get("beacon", False), f"team {name}: beacon")))
    names = [u.ifname for u in cfg.uplinks] + [u.ifname for t in cfg.teams for u in t.uplinks]
    if len(set(names)) != len(names):
        raise ConfigError("an interface is used by two uplinks")
    return cfg


def _beacon(value: Any, what: str) -> tuple[float, int] | None:
    """false, true (1 s, 3 misses) or {"interval": s, "misses": n}."""
    if value is False or value is None:
        return None
    if value is True:
        return (1.0, 3)
    b = _keys(value, what, {"interval", "misses"})
    interval = b.get("interval", 1.0)
    if isinstance(interval, bool) or not isinstance(interval, (int, float)) or not 0.01 <= interval <= 60:
        raise ConfigError(f"{what}.interval must be 0.01..60 seconds, not {interval!r}")
    return (float(interval), _int(b.get("misses", 3), f"{what}.misses", 1, 100))


def _uplinks(items: Any, what: str) -> list[UplinkConfig]:
    if not isinstance(items, list):
        raise ConfigError(f"{what} must be a list")
    out = []
    for i, u in enumerate(items):
        u = _keys(u, f"{what}[{i}]", {"type", "ifname"})
        if u.get("type") not in UPLINK_TYPES:
            raise ConfigError(f"{what}[{i}].type must be one of {', '.join(UPLINK_TYPES)}")
        ifname = u.get("ifname")
        if not isinstance(ifname, str) or not 0 < len(ifname) < 16 or "/" in ifname or " " in ifname:
            raise ConfigError(f"{what}[{i}].ifname must be an interface name (1-15 characters)")
        out.append(UplinkConfig(u["type"], ifname))
    return out


def load_config(path: str | None) -> SwitchConfig:
    if path is None:
        return SwitchConfig()
    try:
        with open(path) as f:
            data = json.load(f)
    except OSError as e:
        raise ConfigError(f"cannot read {path}: {e.strerror}") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not JSON ({e.msg} at line {e.lineno})") from None
    return parse_config(data)
