"""Multi-tenant API keys: 401 / 403, task scopes by glob, admin-only writes, keys never logged."""

from __future__ import annotations

import json
import logging

import httpx
import pytest
from live_server_util import assert_error

from server.auth import AuthError, KeyRing, KeysFileError

ADMIN, ACME, ACME_ADMIN, GLOBEX = "admin-key-0001", "acme-key-0001", "acme-admin-0001", "globex-key-0001"


def as_key(live, key: str | None) -> httpx.Client:
    headers = {} if key is None else {"Authorization": f"Bearer {key}"}
    return live.client(headers=headers)


def test_health_and_ready_need_no_key_everything_else_does(auth_server):
    with as_key(auth_server, None) as c:
        assert c.get("/health").status_code == 200 and c.get("/ready").status_code == 200
        for method, path in (("POST", "/generate"), ("POST", "/generate_stream"), ("POST", "/"),
                             ("GET", "/v1/tasks"), ("GET", "/v1/models"), ("GET", "/metrics"),
                             ("POST", "/v1/completions"), ("DELETE", "/v1/tasks/acme-a"), ("GET", "/info")):
            r = c.request(method, path, json={"inputs": "x", "task_id": "acme-a"})
            assert_error(r, 401, "unauthorized")
            assert r.headers["www-authenticate"] == "Bearer"
    for header in ("Bearer wrong-key-123", "Basic " + ADMIN, "Bearer", ADMIN):
        r = httpx.get(auth_server.url + "/v1/tasks", headers={"Authorization": header})
        assert_error(r, 401, "unauthorized")


def test_tenant_sees_and_uses_only_its_tasks(auth_server):
    with as_key(auth_server, ACME) as c:
        assert [t["id"] for t in c.get("/v1/tasks").json()["tasks"]] == ["acme-a", "acme-b"]
        assert [m["id"] for m in c.get("/v1/models").json()["data"]] == ["acme-a", "acme-b"]  # no base model
        assert c.post("/generate", json={"inputs": "x", "task_id": "acme-a"}).status_code == 200
        assert c.get("/v1/tasks/acme-b").status_code == 200
        # Out of scope: 403 whether or not the task exists (so names do not leak).
        for task_id in ("globex-a", "does-not-exist"):
            assert_error(c.post("/generate", json={"inputs": "x", "task_id": task_id}), 403, "forbidden")
            assert_error(c.get(f"/v1/tasks/{task_id}"), 403, "forbidden")
        assert_error(c.post("/generate", json={"inputs": "x"}), 403)  # base_model: false
        assert_error(c.get("/v1/models/globex-a"), 403)
        assert_error(c.get("/v1/models/tiny"), 403)
        assert c.get("/v1/models/acme-b").json()["id"] == "acme-b"
        assert_error(c.post("/v1/completions", json={"model": "globex-a", "prompt": "x"}), 403)
    with as_key(auth_server, GLOBEX) as c:
        assert [t["id"] for t in c.get("/v1/tasks").json()["tasks"]] == ["globex-a", "shared-1"]
        models = [m["id"] for m in c.get("/v1/models").json()["data"]]
        assert models == ["tiny", "globex-a", "shared-1"]
        assert c.post("/generate", json={"inputs": "x"}).status_code == 200  # the bare model


def test_only_admins_write_and_only_in_their_scope(auth_server):
    body = {"init": "random", "num_virtual_tokens": 2}
    with as_key(auth_server, ACME) as c:
        assert_error(c.put("/v1/tasks/acme-new", json=body), 403, "forbidden")
        assert_error(c.delete("/v1/tasks/acme-a"), 403, "forbidden")
        assert_error(c.get("/metrics"), 403, "forbidden")
    with as_key(auth_server, ACME_ADMIN) as c:
        assert c.put("/v1/tasks/acme-new", json=body).status_code == 201
        assert_error(c.put("/v1/tasks/globex-new", json=body), 403, "forbidden")
        assert_error(c.delete("/v1/tasks/globex-a"), 403)
        assert c.delete("/v1/tasks/acme-new").status_code == 204
    with as_key(auth_server, ADMIN) as c:
        assert c.get("/metrics").status_code == 200
        assert c.get("/v1/tasks").json()["total"] == 5


def test_keys_are_never_logged(auth_server, caplog):
    with caplog.at_level(logging.DEBUG):
        for key in (ACME, "Bearer-not-a-key-999"):
            with as_key(auth_server, key) as c:
                c.post("/generate", json={"inputs": "x", "task_id": "acme-a"})
                c.get("/v1/tasks?x=1")
    text = caplog.text + "".join(str(r.__dict__) for r in caplog.records)
    assert "promptserve.access" in {r.name for r in caplog.records}
    assert ACME not in text and "not-a-key-999" not in text


def test_keyring_formats_and_errors(tmp_path):
    yaml_file = tmp_path / "k.yaml"
    yaml_file.write_text("k-12345678:\n  tenant: t\n  tasks: ['a-*']\n")
    json_file = tmp_path / "k.json"
    json_file.write_text(json.dumps([{"key": "j-12345678", "tenant": "j", "admin": True, "tasks": ["*"]}]))
    t = KeyRing.from_file(yaml_file).authenticate("Bearer k-12345678")
    assert (t.name, t.may_use("a-1"), t.may_use("b-1"), t.may_write("a-1")) == ("t", True, False, False)
    j = KeyRing.from_file(json_file).authenticate("bearer j-12345678")
    assert j.is_admin and j.may_write("anything")
    with pytest.raises(AuthError):
        KeyRing.from_file(json_file).authenticate("Bearer j-1234567")
    for bad in ("[1, 2]", "{keys: 3}", "- key: short\n  tenant: t\n", "- key: secret-secret\n  tenant: t\n  bogus: 1\n",
                "[{key: dup-dup-dup, tenant: a}, {key: dup-dup-dup, tenant: b}]"):
        yaml_file.write_text(bad)
        with pytest.raises(KeysFileError) as err:
            KeyRing.from_file(yaml_file)
        assert "secret-secret" not in str(err.value) and "dup-dup-dup" not in str(err.value)
    with pytest.raises(KeysFileError):
        KeyRing.from_file(tmp_path / "missing.yaml")
