"""API keys -> tenants: who may use which tasks, who may write them.

The keys file is JSON or YAML, either a list or a mapping keyed by the key itself:

    keys:
      - key: "sk-acme-123"
        tenant: acme
        tasks: ["acme-*", "shared-*"]   # glob patterns over task ids
        admin: false                    # admins may also create and delete the tasks they can see
        base_model: true                # may call the bare model (no task)
        operator: false                 # may read every tenant's usage and metrics
        weight: 3                       # the tenant's share of the batch (default 1)
        limits:                         # the tenant's limits (each optional; per server process)
          requests_per_minute: 600
          tokens_per_minute: 200000     # input + virtual + generated tokens
          max_concurrent: 32
          tokens_per_day: 10000000      # resets at 00:00 UTC

`weight` and `limits` belong to the tenant: set them on any of its keys; keys of one tenant that set
different values are refused.

Keys are kept only as SHA-256 digests and compared in constant time; they are never logged.
"""

from __future__ import annotations

import hashlib
import hmac
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from server.tenancy.limits import NO_LIMITS, Limits
from server.tenancy.tenant import Tenant


class AuthError(Exception):
    """Missing or unknown API key (HTTP 401)."""


class ForbiddenError(Exception):
    """The key is valid but may not do this (HTTP 403)."""


class KeysFileError(ValueError):
    """The keys file cannot be read or is malformed (the server refuses to start)."""


class _KeyEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")
    key: str = Field(min_length=8)
    tenant: str = Field(min_length=1)
    tasks: list[str] = Field(default_factory=list)
    admin: bool = False
    base_model: bool = True
    operator: bool = False
    weight: float | None = Field(None, gt=0)
    limits: Limits | None = None


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8")).digest()


class KeyRing:
    """The configured keys; `authenticate` maps a bearer key to its tenant."""

    def __init__(self, entries: list[tuple[bytes, Tenant]]):
        self._entries = entries

    @classmethod
    def from_file(cls, path: str | Path) -> KeyRing:
        """Read a JSON or YAML keys file (see the module docstring)."""
        try:
            raw = yaml.safe_load(Path(path).read_text(encoding="utf-8"))  # YAML is a superset of JSON
        except (OSError, yaml.YAMLError) as e:
            raise KeysFileError(f"cannot read API keys file {path}: {type(e).__name__}") from None
        return cls.from_data(raw, source=str(path))

    @classmethod
    def from_data(cls, raw: object, source: str = "keys") -> KeyRing:
        """Build from parsed JSON/YAML: a list of entries, {"keys": [...]}, or {key: {tenant, ...}}."""
        parsed: list[_KeyEntry] = []
        for i, item in enumerate(_entry_dicts(raw, source)):
            try:
                parsed.append(_KeyEntry.model_validate(item))
            except ValidationError as err:
                fields = ", ".join(".".join(map(str, x["loc"])) + ": " + x["msg"] for x in err.errors())
                raise KeysFileError(f"{source}: entry {i}: {fields}") from None  # never echo the key
        shares = _tenant_shares(parsed, source)
        entries = [(_digest(e.key), Tenant(e.tenant, tuple(e.tasks), e.admin, e.base_model, e.operator,
                                           *shares[e.tenant])) for e in parsed]
        if len({d for d, _ in entries}) != len(entries):
            raise KeysFileError(f"{source}: the same key appears twice")
        return cls(entries)

    def authenticate(self, authorization: str | None) -> Tenant:
        """The tenant for an `Authorization: Bearer <key>` header; AuthError if missing or unknown."""
        if not authorization:
            raise AuthError("missing API key: send 'Authorization: Bearer <key>'")
        scheme, _, key = authorization.partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            raise AuthError("malformed Authorization header: expected 'Bearer <key>'")
        presented = _digest(key.strip())
        found: Tenant | None = None
        for digest, tenant in self._entries:  # no early exit: the time does not depend on which key
            if hmac.compare_digest(digest, presented):
                found = tenant
        if found is None:
            raise AuthError("invalid API key")
        return found


def _tenant_shares(entries: list[_KeyEntry], source: str) -> dict[str, tuple[float, Limits]]:
    """Each tenant's (weight, limits): what its keys set, the same on each key that sets them."""
    shares: dict[str, tuple[float | None, Limits | None]] = {}
    for e in entries:
        weight, limits = shares.get(e.tenant, (None, None))
        if None not in (weight, e.weight) and weight != e.weight or None not in (limits, e.limits) and limits != e.limits:
            raise KeysFileError(f"{source}: the keys of tenant {e.tenant!r} set different weights or limits; "
                                "set them the same on each key (or on one key only)")
        shares[e.tenant] = (e.weight if weight is None else weight, e.limits if limits is None else limits)
    return {name: (1.0 if w is None else w, NO_LIMITS if lim is None else lim) for name, (w, lim) in shares.items()}


def _entry_dicts(raw: object, source: str) -> list[dict]:
    if isinstance(raw, dict) and "keys" in raw:
        raw = raw["keys"]
    if isinstance(raw, dict):  # {key: {tenant, tasks, admin}}
        out = []
        for key, body in raw.items():
            if not isinstance(body, dict):
                raise KeysFileError(f"{source}: each key must map to an object")
            out.append({"key": str(key), **body})
        return out
    if isinstance(raw, list) and all(isinstance(x, dict) for x in raw):
        return raw
    raise KeysFileError(f"{source}: expected a list of key entries or a mapping of key -> entry")
