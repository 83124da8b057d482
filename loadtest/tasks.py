"""Tasks for a run: created through the admin API before it and deleted after, or taken from the server."""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field

import httpx

from loadtest.config import TaskSetup


class TaskSetupError(RuntimeError):
    """The server refused to create (or list) the tasks a run needs."""


@dataclass
class CreatedTasks:
    """Tasks this run created (and must delete)."""

    task_ids: list[str] = field(default_factory=list)
    seconds: float = 0.0


def task_body(setup: TaskSetup) -> dict:
    """The JSON body of PUT /v1/tasks/{id} for `setup`."""
    body = {"init": setup.init, "num_virtual_tokens": setup.num_virtual_tokens}
    if setup.init == "text":
        body["text"] = setup.text
    return body


async def create_tasks(client: httpx.AsyncClient, setup: TaskSetup, created: CreatedTasks) -> None:
    """PUT `setup.num_tasks` new tasks; their ids are appended to `created` as they succeed."""
    prefix = f"loadtest-{secrets.token_hex(3)}"
    for i in range(setup.num_tasks):
        task_id = f"{prefix}-{i:04d}"
        response = await client.put(f"/v1/tasks/{task_id}", json=task_body(setup))
        if response.status_code not in (200, 201):
            raise TaskSetupError(f"PUT /v1/tasks/{task_id} -> {response.status_code}: {response.text[:200]}")
        created.task_ids.append(task_id)


async def delete_tasks(client: httpx.AsyncClient, task_ids: list[str]) -> list[str]:
    """DELETE each task; returns the ids that could not be deleted."""
    failed = []
    for task_id in task_ids:
        try:
            response = await client.delete(f"/v1/tasks/{task_id}")
            if response.status_code not in (200, 202, 204, 404):
                failed.append(task_id)
        except httpx.HTTPError:
            failed.append(task_id)
    return failed


def task_ids_from_listing(payload) -> list[str]:
    """Task ids from GET /v1/tasks, whether it is a list or wrapped in {"tasks": [...]} / {"data": [...]}."""
    items = payload
    if isinstance(payload, dict):
        items = next((payload[k] for k in ("tasks", "data", "items") if k in payload), [])
    ids = []
    for item in items:
        if isinstance(item, str):
            ids.append(item)
        elif isinstance(item, dict):
            value = item.get("task_id", item.get("id"))
            if value is not None:
                ids.append(str(value))
    return ids


async def existing_tasks(client: httpx.AsyncClient, limit: int, page_size: int = 1000) -> list[str]:
    """Up to `limit` task ids that exist on the server (sorted, for repeatable runs), read page by page
    (`limit`/`offset`) until enough, a short page, or a page with nothing new (a server without paging)."""
    ids: set[str] = set()
    offset = 0
    while len(ids) < limit:
        response = await client.get("/v1/tasks", params={"limit": page_size, "offset": offset})
        if response.status_code != 200:
            raise TaskSetupError(f"GET /v1/tasks -> {response.status_code}: {response.text[:200]}")
        page = task_ids_from_listing(response.json())
        new = set(page) - ids
        ids |= new
        offset += len(page)
        if len(page) < page_size or not new:
            break
    return sorted(ids)[:limit]
