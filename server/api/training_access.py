"""What the files and fine-tuning routes share: this server's training service, and the records a tenant
owns (files and jobs are private to the tenant that made them; an admin key too sees only its own)."""

from __future__ import annotations

from fastapi import Request

from server.api.deps import get_runtime
from server.api_error import ApiError
from server.tenancy.tenant import Tenant
from server.training.service import Training

HIDDEN_FIELDS = frozenset({"tenant", "num_examples", "longest_input", "longest_labels", "num_crashes", "was_paused"})


def training_of(request: Request) -> Training:
    """This server's training; 503 while loading or draining, or when the store cannot hold training files."""
    get_runtime(request)
    training: Training = request.app.state.training
    if training.off_reason is not None:
        raise ApiError(503, "unavailable", f"training is off on this server: {training.off_reason}")
    return training


def public(record: dict) -> dict:
    """The OpenAI object, without our bookkeeping."""
    return {k: v for k, v in record.items() if k not in HIDDEN_FIELDS}


def owned(record: dict | None, tenant: Tenant, what: str, ident: str) -> dict:
    """`record` if it is the tenant's, else 404 (another tenant's is not found either)."""
    if record is None or record["tenant"] != tenant.name:
        raise ApiError(404, "not_found", f"no {what} {ident[:64]!r}")
    return record


def lookup(read, ident: str):
    """`read(ident)`, or None for an id that cannot exist."""
    try:
        return read(ident)
    except KeyError:
        return None
