"""`--tenants FILE`: the API keys a run spreads its requests over, read from YAML or JSON.

Two shapes are accepted:

    tenants:                        # the loadtest's own list
      - {name: acme, key: "sk-acme-123", popularity: 3}   # popularity: relative share (default 1)
      - {name: beta, key: "sk-beta-456"}

or the server's `--api-keys` file (a list, `{keys: [...]}`, or a mapping key -> entry): each distinct
tenant takes its first key and popularity 1; the server-only fields (tasks, admin, ...) are ignored.
Error messages never echo a key.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import yaml

LOADTEST_FIELDS = {"name", "key", "popularity"}
MAX_TENANTS = 1000


class TenantsFileError(ValueError):
    """The tenants file cannot be read or is malformed."""


@dataclass(frozen=True)
class TenantSpec:
    """One tenant of a run: its name, its API key, its relative share of the requests."""

    name: str
    key: str
    popularity: float = 1.0

    def __repr__(self) -> str:  # keys stay out of logs and tracebacks
        return f"TenantSpec(name={self.name!r}, key='***', popularity={self.popularity:g})"


def load_tenants(path: str | Path) -> tuple[TenantSpec, ...]:
    """The tenants in the YAML or JSON file at `path`."""
    try:
        raw = yaml.safe_load(Path(path).read_text(encoding="utf-8"))  # YAML is a superset of JSON
    except OSError as exc:
        raise TenantsFileError(f"cannot read tenants file {path}: {exc.strerror or type(exc).__name__}") from None
    except yaml.YAMLError as exc:
        where = getattr(exc, "problem_mark", None)
        line = f" (line {where.line + 1})" if where is not None else ""
        raise TenantsFileError(f"tenants file {path} is not valid YAML or JSON{line}") from None
    return tenants_from_data(raw, source=str(path))


def tenants_from_data(raw: object, source: str = "tenants") -> tuple[TenantSpec, ...]:
    """Tenants from parsed YAML/JSON in either shape (see the module docstring)."""
    if isinstance(raw, dict) and "tenants" in raw:
        tenants = [loadtest_entry(item, i, source) for i, item in enumerate(as_list(raw["tenants"], source))]
    else:
        tenants = first_key_per_tenant(key_entries(raw, source), source)
    check_unique(tenants, source)
    return tuple(tenants)


def as_list(value: object, source: str) -> list:
    """`value` if it is a non-empty list of mappings."""
    if not isinstance(value, list) or not all(isinstance(x, dict) for x in value):
        raise TenantsFileError(f"{source}: 'tenants' must be a list of {{name, key, popularity}} entries")
    if not value:
        raise TenantsFileError(f"{source}: no tenants")
    return value


def loadtest_entry(item: dict, index: int, source: str) -> TenantSpec:
    """One `{name, key, popularity}` entry of the loadtest's own shape."""
    unknown = sorted(map(str, set(item) - LOADTEST_FIELDS))
    if unknown:  # a typo like `popularty` would otherwise be silently ignored
        raise TenantsFileError(f"{source}: tenant {index}: unknown field(s) {', '.join(unknown)} "
                               f"(expected name, key, popularity)")
    name = text_field(item, "name", index, source)
    key = text_field(item, "key", index, source)
    popularity = item.get("popularity", 1)
    if isinstance(popularity, bool) or not isinstance(popularity, (int, float)) \
            or not math.isfinite(popularity) or popularity <= 0:
        raise TenantsFileError(f"{source}: tenant {index} ({name}): popularity must be a number > 0")
    return TenantSpec(name, key, float(popularity))


def text_field(item: dict, field: str, index: int, source: str) -> str:
    """A required non-empty string field of entry `index`."""
    value = item.get(field)
    if not isinstance(value, str) or not value.strip():
        raise TenantsFileError(f"{source}: entry {index}: '{field}' must be a non-empty string")
    return value.strip()


def key_entries(raw: object, source: str) -> list[dict]:
    """The entries of a server keys file: a list, {"keys": [...]}, or {key: {tenant, ...}}."""
    if isinstance(raw, dict) and "keys" in raw:
        raw = raw["keys"]
    if isinstance(raw, dict):
        if not all(isinstance(body, dict) for body in raw.values()):
            raise TenantsFileError(f"{source}: in a mapping of key -> entry, each key must map to an object")
        return [{**body, "key": str(key)} for key, body in raw.items()]
    if isinstance(raw, list) and raw and all(isinstance(x, dict) for x in raw):
        return raw
    raise TenantsFileError(f"{source}: expected 'tenants: [{{name, key, popularity}}, ...]' or a server "
                           f"API keys file (a list of {{key, tenant, ...}}, 'keys: [...]', or key -> entry)")


def first_key_per_tenant(entries: list[dict], source: str) -> list[TenantSpec]:
    """One TenantSpec per distinct tenant, with its first key, in file order."""
    tenants: dict[str, TenantSpec] = {}
    for i, item in enumerate(entries):
        if "tenant" not in item and "name" in item:
            raise TenantsFileError(f"{source}: entry {i} has 'name' but no 'tenant': "
                                   f"a loadtest tenants list goes under 'tenants:'")
        key = text_field(item, "key", i, source)
        name = text_field(item, "tenant", i, source)
        tenants.setdefault(name, TenantSpec(name, key))
    return list(tenants.values())


def check_unique(tenants: list[TenantSpec], source: str) -> None:
    """Refuse repeated names or keys (two tenants on one key would be one tenant to the server)."""
    if len(tenants) > MAX_TENANTS:
        raise TenantsFileError(f"{source}: at most {MAX_TENANTS} tenants")
    names = [t.name for t in tenants]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise TenantsFileError(f"{source}: tenant name(s) repeated: {', '.join(repeated)}")
    if len({t.key for t in tenants}) != len(tenants):
        raise TenantsFileError(f"{source}: two tenants share one key")
