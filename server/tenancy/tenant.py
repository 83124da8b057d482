"""Tenant: who is calling (an API key's tenant), what it may touch, and its share and limits.

auth.py builds tenants from the keys file; the API and the tenancy gate read them.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass

from server.tenancy.limits import NO_LIMITS, Limits


@dataclass(frozen=True)
class Tenant:
    """Who is calling, what they may touch, and their share and limits."""

    name: str
    task_patterns: tuple[str, ...]
    is_admin: bool
    may_use_base_model: bool
    is_operator: bool = False
    weight: float = 1.0
    limits: Limits = NO_LIMITS

    def may_use(self, task_id: str | None) -> bool:
        """True if this tenant may read or run `task_id` (None: the bare model)."""
        if task_id is None:
            return self.may_use_base_model
        # fnmatchcase: the same answer on every OS, task ids are case-sensitive.
        return any(fnmatch.fnmatchcase(task_id, p) for p in self.task_patterns)

    def may_write(self, task_id: str) -> bool:
        """True if this tenant may create, replace or delete `task_id`."""
        return self.is_admin and self.may_use(task_id)

    def may_read_usage_of(self, tenant: str) -> bool:
        """True if this key may read `tenant`'s usage (its own; every tenant's for an operator)."""
        return self.is_operator or tenant == self.name


OPEN_TENANT = Tenant(name="anonymous", task_patterns=("*",), is_admin=True, may_use_base_model=True,
                     is_operator=True)
