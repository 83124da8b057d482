"""Hostile tenants, round two (issue 23), against a real server with API keys: inputs refused before anything
is allocated, reserved or logged for them; forged adapter metadata; the scope of keys over docs and metrics."""

from __future__ import annotations

import json
import logging
import socket

import pytest
import torch
import yaml
from live_server_util import assert_error, run_server
from safetensors.torch import save

HIDDEN = 64  # the tiny llama's hidden size
OPERATOR = {"Authorization": "Bearer hr2-operator-key"}
ACME = {"Authorization": "Bearer hr2-acme-admin-key"}  # acme-* admin; 2 at once, tokens metered
GLOBEX = {"Authorization": "Bearer hr2-globex-user-key"}
RPM = {"Authorization": "Bearer hr2-rpm-user-key01"}  # one request a minute
KEYS = [
    {"key": "hr2-operator-key", "tenant": "ops", "tasks": ["*"], "admin": True, "operator": True},
    {"key": "hr2-acme-admin-key", "tenant": "acme", "tasks": ["acme-*"], "admin": True,
     "limits": {"max_concurrent": 2, "tokens_per_minute": 1000000000}},
    {"key": "hr2-globex-user-key", "tenant": "globex", "tasks": ["globex-*"]},
    {"key": "hr2-rpm-user-key01", "tenant": "rpm", "tasks": ["rpm-*"], "limits": {"requests_per_minute": 1}},
]
MAX_TASKS_PER_HOUR = 20


@pytest.fixture(scope="module")
def live(rel_settings, tmp_path_factory):
    keys = tmp_path_factory.mktemp("hr2-keys") / "keys.yaml"
    keys.write_text(yaml.safe_dump({"keys": KEYS}))
    settings = rel_settings(api_keys=keys, usage_max_tasks_per_hour=MAX_TASKS_PER_HOUR)
    with run_server(settings) as server:
        with server.client(headers=OPERATOR) as c:
            for task in ("acme-x", "rpm-x", "globex-x"):
                assert c.put(f"/v1/tasks/{task}", json={"init": "random", "num_virtual_tokens": 4}).status_code == 201
        yield server


def _post_raw(c, path: str, raw: str):
    return c.post(path, content=raw.encode(), headers={"content-type": "application/json"})


@pytest.mark.parametrize("raw", [
    '{"init": "random", "num_virtual_tokens": 1000000000000}',
    '{"init": "sample_vocab", "num_virtual_tokens": 1000000000000}',
    '{"init": "text", "text": "the river", "num_virtual_tokens": 1000000000000}',
    '{"init": "random", "num_virtual_tokens": 1000000000000000000000000000000}',
    '{"init": "random", "num_virtual_tokens": 513}',  # over the server's --max-virtual-tokens (512)
    '{"init": "text", "num_virtual_tokens": 4, "text": "' + "x" * 10_001 + '"}',
])
def test_task_init_is_refused_before_anything_is_allocated(live, raw):
    with live.client(headers=OPERATOR) as c:
        r = c.put("/v1/tasks/huge", content=raw.encode(), headers={"content-type": "application/json"})
        body = assert_error(r, 422)
        assert "num_virtual_tokens" in body["error"] or "text" in body["error"], body
        assert_error(c.get("/v1/tasks/huge"), 404)


@pytest.mark.parametrize(("path", "raw"), [
    ("/generate", '{"task_id": "acme-x", "inputs": "x", "parameters": {"max_new_tokens": 1%s}}'),
    ("/v1/completions", '{"model": "acme-x", "prompt": "x", "max_tokens": 1%s}'),
    ("/v1/chat/completions", '{"model": "acme-x", "messages": [{"role": "user", "content": "x"}], '
                             '"max_completion_tokens": 1%s}'),
])
def test_absurd_max_new_tokens_is_422_and_leaves_the_tenant_able_to_run(live, path, raw):
    """A 400-digit max_new_tokens overflowed the limiter's float arithmetic after the in-flight count was taken:
    two such requests used up acme's max_concurrent of 2 for good."""
    with live.client(headers=ACME) as c:
        for digits in ("0" * 400, "00000"):  # far past any type, and just past the server's 256
            for _ in range(3):
                assert_error(_post_raw(c, path, raw % digits), 422)
        for _ in range(3):
            r = c.post("/generate", json={"task_id": "acme-x", "inputs": "x", "parameters": {"max_new_tokens": 2}})
            assert r.status_code == 200, r.text


def test_invalid_task_ids_are_400_before_the_403_the_log_and_the_meters(live, caplog):
    huge = "acme-" + "x" * 200_000
    with caplog.at_level(logging.INFO, logger="promptserve.access"), live.client(headers=GLOBEX) as c:
        for r in (c.post("/generate", json={"task_id": huge, "inputs": "x"}),
                  c.post("/v1/completions", json={"model": huge, "prompt": "x", "max_tokens": 2}),
                  c.post("/generate", json={"inputs": "x", "parameters": {"adapter_id": huge}})):
            body = assert_error(r, 400, "invalid_task_id")
            assert len(body["error"]) < 300, len(body["error"])
        usage = c.get("/v1/usage").json()
    assert all(len(row["task"] or "") <= 128 for row in usage["by_task"]), usage["by_task"]
    logged = [r.getMessage() for r in caplog.records if r.name == "promptserve.access"]
    assert logged and max(len(line) for line in logged) < 2000


def test_usage_totals_stay_bounded_whatever_task_ids_a_tenant_sends(live):
    with live.client(headers=RPM) as c:
        assert c.post("/generate", json={"task_id": "rpm-x", "inputs": "x",
                                         "parameters": {"max_new_tokens": 2}}).status_code in (200, 429)
        for i in range(3 * MAX_TASKS_PER_HOUR):  # refused by the rate limit, each metered under its task id
            assert_error(c.post("/generate", json={"task_id": f"rpm-made-up-{i}", "inputs": "x"}), 429)
        rows = c.get("/v1/usage").json()["by_task"]
    assert len(rows) <= MAX_TASKS_PER_HOUR + 1, len(rows)
    other = [row for row in rows if row["task"] == "__other__"]
    assert other and sum(row["rate_limited"] for row in rows) >= 3 * MAX_TASKS_PER_HOUR


@pytest.mark.parametrize("ident", ["f" * 300, "file-" + "a" * 300, "ftjob-" + "0" * 5000])
def test_long_file_and_job_ids_are_404(live, ident):
    with live.client(headers=OPERATOR) as c:
        for r in (c.get(f"/v1/files/{ident}"), c.delete(f"/v1/files/{ident}"), c.get(f"/v1/fine_tuning/jobs/{ident}"),
                  c.get(f"/v1/fine_tuning/jobs/{ident}/events"), c.post(f"/v1/fine_tuning/jobs/{ident}/cancel")):
            body = assert_error(r, 404, "not_found")
            assert len(body["error"]) < 200


def _weights(tensor: torch.Tensor, metadata: dict | None = None) -> bytes:
    return save({"prompt_embeddings": tensor.contiguous()}, metadata=metadata)


def _config(n: int = 4, token_dim: int = HIDDEN) -> bytes:
    return json.dumps({"peft_type": "PROMPT_TUNING", "task_type": "CAUSAL_LM", "num_virtual_tokens": n,
                       "token_dim": token_dim, "num_transformer_submodules": 1}).encode()


def _upload(c, task_id: str, config: bytes, weights: bytes):
    return c.put(f"/v1/tasks/{task_id}", files={"config": ("adapter_config.json", config),
                                                "weights": ("adapter_model.safetensors", weights)})


@pytest.mark.parametrize("created", ["nan", "inf", "-1e308", "1e400", "not a number"])
def test_forged_header_metadata_neither_fails_nor_poisons_listings(live, created):
    tensor = torch.randn(4, HIDDEN)
    forged = {"promptserve_created": created, "promptserve_version": "forged-version"}
    with live.client(headers=OPERATOR) as c:
        assert _upload(c, "acme-forged", _config(), _weights(tensor, forged)).status_code in (200, 201)
        assert _upload(c, "acme-clean", _config(), _weights(tensor)).status_code in (200, 201)
        forged_task, clean = c.get("/v1/tasks/acme-forged").json(), c.get("/v1/tasks/acme-clean").json()
        assert forged_task["version"] == clean["version"] != "forged-version"  # the server's hash of the values
        assert 0 < forged_task["created"] <= forged_task["modified"]
        for key in (OPERATOR, ACME):
            with live.client(headers=key) as k:
                models = k.get("/v1/models")
                assert models.status_code == 200, models.text
                assert "acme-forged" in {m["id"] for m in models.json()["data"]}
                assert k.get("/v1/models/acme-forged").status_code == 200
                assert k.get("/v1/tasks").status_code == 200


def test_deeply_nested_json_is_4xx_everywhere(live):
    deep = "[" * 30_000 + "]" * 30_000  # 60 KB: under every body limit, past any recursion limit
    with live.client(headers=OPERATOR) as c:
        assert_error(_upload(c, "acme-deep", deep.encode(), _weights(torch.randn(4, HIDDEN))), 422, "invalid_adapter")
        for path in ("/generate", "/v1/completions", "/v1/chat/completions", "/v1/fine_tuning/jobs"):
            r = _post_raw(c, path, '{"inputs": ' + deep + "}")
            assert 400 <= r.status_code < 500, (path, r.status_code, r.text[:200])
        r = c.put("/v1/tasks/acme-deep", content=deep.encode(), headers={"content-type": "application/json"})
        assert 400 <= r.status_code < 500, r.text[:200]


def test_a_tenants_admin_key_sees_no_server_wide_metrics(live):
    with live.client(headers=ACME) as c:
        assert c.post("/generate", json={"task_id": "acme-x", "inputs": "x",
                                         "parameters": {"max_new_tokens": 2}}).status_code == 200
        scoped = c.get("/metrics").text
    with live.client(headers=OPERATOR) as c:
        everything = c.get("/metrics").text
    samples = _samples(scoped)
    assert samples and all('task="acme-' in line or 'tenant="acme"' in line for line in samples), samples
    for name in ("promptserve_queue_depth ", "promptserve_http_requests_total{", "promptserve_engine_steps_total "):
        assert any(line.startswith(name) for line in _samples(everything)), name


def _samples(text: str) -> list[str]:
    return [line for line in text.splitlines() if line and not line.startswith("#")]


@pytest.mark.parametrize("path", ["/docs", "/redoc", "/openapi.json", "/docs/oauth2-redirect"])
def test_docs_and_schema_need_a_key(live, path):
    with live.client() as anonymous:
        assert_error(anonymous.get(path), 401, "unauthorized")
        assert anonymous.get("/health").status_code == 200 and anonymous.get("/ready").status_code == 200
    with live.client(headers=GLOBEX) as c:
        assert c.get(path).status_code == 200


@pytest.mark.parametrize(("path", "content_type"), [("/v1/files", "multipart/form-data; boundary=b"),
                                                    ("/v1/tasks/acme-up", "multipart/form-data; boundary=b"),
                                                    ("/v1/fine_tuning/jobs", "application/json")])
def test_no_key_is_refused_before_the_body_is_read(live, path, content_type):
    """The client announces 50 MB and sends none of it: the 401 must come on the headers alone."""
    host, port = live.url.removeprefix("http://").split(":")
    method = "PUT" if path.startswith("/v1/tasks") else "POST"
    with socket.create_connection((host, int(port)), timeout=20) as sock:
        sock.sendall(f"{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Type: {content_type}\r\n"
                     f"Content-Length: 50000000\r\n\r\n--b\r\n".encode())
        head = sock.recv(4096).decode("latin-1")  # times out (fails) if the server waits for the body first
    assert head.startswith("HTTP/1.1 401"), head[:200]
