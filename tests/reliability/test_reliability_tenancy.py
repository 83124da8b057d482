"""Tenancy: a tenant cannot read, list, use or overwrite another tenant's task through any endpoint."""

from __future__ import annotations

import pytest
from live_server_util import assert_error

ADMIN = {"Authorization": "Bearer rel-admin-key-1"}
TENANTS = {"acme": ("rel-acme-key-01", "acme-x"), "globex": ("rel-globex-key1", "globex-x")}
PAIRS = [("acme", "globex"), ("globex", "acme")]


def _auth(tenant: str) -> dict:
    return {"Authorization": f"Bearer {TENANTS[tenant][0]}"}


def _use_calls(task: str) -> list[tuple[str, str, dict]]:
    gen = {"inputs": "x", "parameters": {"max_new_tokens": 2}}
    return [
        ("POST", "/generate", {**gen, "task_id": task}),
        ("POST", "/generate_stream", {**gen, "task_id": task}),
        ("POST", "/", {**gen, "task_id": task}),
        ("POST", "/generate", {"inputs": "x", "parameters": {"max_new_tokens": 2, "adapter_id": task}}),
        ("POST", f"/tasks/{task}/generate", gen),
        ("POST", f"/tasks/{task}/generate_stream", gen),
        ("POST", f"/tasks/{task}", gen),
        ("POST", "/v1/completions", {"model": task, "prompt": "x", "max_tokens": 2}),
        ("POST", "/v1/completions", {"model": task, "prompt": "x", "max_tokens": 2, "stream": True}),
        ("POST", "/v1/chat/completions", {"model": task, "messages": [{"role": "user", "content": "x"}],
                                          "max_tokens": 2}),
        ("GET", f"/v1/models/{task}", None),
        ("GET", f"/v1/tasks/{task}", None),
    ]


@pytest.mark.parametrize("me,other", PAIRS)
@pytest.mark.parametrize("existing", [True, False])
def test_cannot_use_or_read_another_tenants_task(rel_auth_server, me, other, existing):
    task = TENANTS[other][1] if existing else f"{other}-missing"
    with rel_auth_server.client(headers=_auth(me)) as c:
        for method, path, body in _use_calls(task):
            r = c.request(method, path, json=body)
            # 403 whether the task exists or not: the answer leaks no names
            assert_error(r, 403, "forbidden")
            assert task not in r.text or "not available" in r.text


@pytest.mark.parametrize("me,other", PAIRS)
def test_lists_show_only_own_tasks(rel_auth_server, me, other):
    mine = TENANTS[me][1]
    with rel_auth_server.client(headers=_auth(me)) as c:
        tasks = [t["id"] for t in c.get("/v1/tasks", params={"limit": 1000}).json()["tasks"]]
        assert tasks == [mine]
        assert c.get("/v1/tasks", params={"prefix": other}).json() == {"tasks": [], "total": 0}
        models = [m["id"] for m in c.get("/v1/models").json()["data"]]
        assert mine in models and TENANTS[other][1] not in models
        r = c.get("/metrics")
        if me == "acme":  # an admin scoped to acme-*: its metrics show no other tenant's task label
            assert r.status_code == 200 and f'task="{TENANTS[other][1]}"' not in r.text
        else:
            assert_error(r, 403, "forbidden")  # not an admin


@pytest.mark.parametrize("me,other", PAIRS)
def test_cannot_overwrite_create_or_delete_another_tenants_task(rel_auth_server, me, other):
    target = TENANTS[other][1]
    with rel_auth_server.client(headers=ADMIN) as admin:
        before = admin.get(f"/v1/tasks/{target}").json()
    with rel_auth_server.client(headers=_auth(me)) as c:
        assert_error(c.put(f"/v1/tasks/{target}", json={"init": "random", "num_virtual_tokens": 2}), 403)
        assert_error(c.put(f"/v1/tasks/{target}", files={"config": ("c.json", b"{}"), "weights": ("w", b"0")}), 403)
        assert_error(c.put(f"/v1/tasks/{other}-new", json={"init": "random", "num_virtual_tokens": 2}), 403)
        assert_error(c.delete(f"/v1/tasks/{target}"), 403)
    with rel_auth_server.client(headers=ADMIN) as admin:
        assert admin.get(f"/v1/tasks/{target}").json() == before  # same version, untouched
        assert_error(admin.get(f"/v1/tasks/{other}-new"), 404)


def test_non_admin_cannot_write_even_its_own_tasks(rel_auth_server):
    with rel_auth_server.client(headers=_auth("globex")) as c:
        assert_error(c.put("/v1/tasks/globex-x", json={"init": "random", "num_virtual_tokens": 2}), 403)
        assert_error(c.delete("/v1/tasks/globex-x"), 403)
        assert_error(c.post("/generate", json={"inputs": "x"}), 403)  # no bare model for globex


def test_own_tasks_work_and_metrics_labels_are_admin_only(rel_auth_server):
    for tenant, (_, task) in TENANTS.items():
        with rel_auth_server.client(headers=_auth(tenant)) as c:
            r = c.post("/generate", json={"task_id": task, "inputs": "x", "parameters": {"max_new_tokens": 2}})
            assert r.status_code == 200, r.text
    with rel_auth_server.client() as anonymous:
        assert_error(anonymous.get("/metrics"), 401, "unauthorized")
        assert_error(anonymous.get("/v1/tasks"), 401, "unauthorized")
    with rel_auth_server.client(headers=ADMIN) as admin:
        text = admin.get("/metrics").text
    assert 'task="acme-x"' in text and 'task="globex-x"' in text
    with rel_auth_server.client(headers=_auth("acme")) as scoped_admin:
        text = scoped_admin.get("/metrics").text
    assert 'task="acme-x"' in text and "globex" not in text
