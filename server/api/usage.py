"""GET /v1/usage: a tenant's own usage by task and by hour (an operator's key: any tenant's, or all)."""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable
from datetime import datetime, timezone

from fastapi import APIRouter, Depends, Query, Request
from pydantic import BaseModel

from server.api.deps import get_tenant
from server.api.responses import error_responses
from server.api_error import ApiError
from server.auth import ForbiddenError
from server.tenancy.tenant import Tenant
from server.tenancy.usage_log import Counts, UsageRow

router = APIRouter(tags=["usage"])

ALL_TENANTS = "*"
MAX_SECONDS = 1e11  # the year 5138: datetime's range, with room


class UsageOut(BaseModel):
    """Totals, then the same split by task, by hour, and (several tenants) by tenant."""

    object: str = "usage"
    tenant: str
    start: str
    end: str
    totals: dict
    by_task: list[dict]
    by_hour: list[dict]
    by_tenant: list[dict] | None = None


@router.get("/v1/usage", response_model=UsageOut, response_model_exclude_none=True,
            responses=error_responses(400, 401, 403, 422, 503))
async def usage(request: Request, start: str | None = Query(None, description="ISO 8601 time or Unix seconds; "
                                                            "rounded down to the hour (default: everything kept)"),
                end: str | None = Query(None, description="ISO 8601 time or Unix seconds, exclusive (default: now)"),
                tenant: str | None = Query(None, description="Whose usage: your own (default); an operator's key "
                                           f"may name any tenant, or '{ALL_TENANTS}' for every tenant"),
                caller: Tenant = Depends(get_tenant)) -> dict:
    """Requests, input, virtual and generated tokens, queue seconds and 429s, by task and by UTC hour."""
    who = tenant or caller.name
    if not caller.may_read_usage_of(who):
        raise ForbiddenError("this API key may read only its own tenant's usage")
    since = _time("start", start, default=0.0)
    until = _time("end", end, default=time.time() + 1)
    if until <= since:
        raise ApiError(400, "bad_request", "end must be after start")
    names = None if who == ALL_TENANTS else {who}
    log = request.app.state.tenant_gate.usage
    if log is None:
        raise ApiError(503, "unavailable", "usage metering is off: the server cannot write its usage folder "
                       "(--usage-dir); see its log")
    rows = await asyncio.to_thread(log.rows, names, since, until)
    out = {"tenant": who, "start": _iso(since), "end": _iso(until), "totals": _total(rows).json(),
           "by_task": [{"task": k, **c.json()} for k, c in _grouped(rows, lambda r: r.task)],
           "by_hour": [{"hour": _iso(k), **c.json()} for k, c in _grouped(rows, lambda r: r.hour)]}
    if names is None:
        out["by_tenant"] = [{"tenant": k, **c.json()} for k, c in _grouped(rows, lambda r: r.tenant)]
    return out


def _total(rows: list[UsageRow]) -> Counts:
    total = Counts()
    for row in rows:
        total.add(row.counts)
    return total


def _grouped(rows: list[UsageRow], key: Callable[[UsageRow], object]) -> list[tuple[object, Counts]]:
    groups: dict = {}
    for row in rows:
        groups.setdefault(key(row), Counts()).add(row.counts)
    return sorted(groups.items(), key=lambda kv: (kv[0] is None, kv[0] if kv[0] is not None else ""))


def _time(name: str, value: str | None, default: float) -> float:
    if value is None:
        return default
    try:
        seconds = float(value)
    except ValueError:
        try:
            parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            seconds = math.nan
        else:
            seconds = (parsed if parsed.tzinfo else parsed.replace(tzinfo=timezone.utc)).timestamp()
    if not 0 <= seconds <= MAX_SECONDS:  # NaN too
        raise ApiError(400, "bad_request", f"{name} must be an ISO 8601 time or Unix seconds between 0 and "
                       f"{MAX_SECONDS:.0f}, not {value[:40]!r}")
    return seconds


def _iso(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, tz=timezone.utc).isoformat().replace("+00:00", "Z")
