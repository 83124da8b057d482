"""Two real servers (uvicorn on loopback) on one store folder with --shared-store, as replicas on a
shared volume: a task written or deleted through one is served correctly by the other on its next
request, including a replace of a task the other has cached."""

from __future__ import annotations

from live_server_util import assert_error, run_server


def _generate(client, task_id: str):
    return client.post("/generate", json={"task_id": task_id, "inputs": "The river", "parameters":
                                          {"max_new_tokens": 3, "details": True}})


def test_writes_through_one_server_are_served_by_the_other(make_settings, tmp_path):
    store = tmp_path / "shared"
    with run_server(make_settings(store=store, shared_store=True)) as a, \
            run_server(make_settings(store=store, shared_store=True)) as b, a.client() as ca, b.client() as cb:
        first = ca.put("/v1/tasks/shared-task", json={"init": "random", "num_virtual_tokens": 3, "seed": 1})
        assert first.status_code == 201, first.text
        r = _generate(cb, "shared-task")
        assert r.status_code == 200 and r.json()["details"]["task_version"] == first.json()["version"]
        second = ca.put("/v1/tasks/shared-task", json={"init": "random", "num_virtual_tokens": 5, "seed": 2})
        assert second.status_code == 200 and second.json()["version"] != first.json()["version"]
        r = _generate(cb, "shared-task")  # b had the first version cached
        assert r.status_code == 200, r.text
        assert r.json()["details"]["task_version"] == second.json()["version"]
        assert r.json()["details"]["virtual_tokens"] == 5
        assert ca.delete("/v1/tasks/shared-task").status_code == 204
        assert_error(_generate(cb, "shared-task"), 404)
        assert_error(cb.get("/v1/tasks/shared-task"), 404)
