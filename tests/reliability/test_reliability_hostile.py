"""Hostile input: traversal, huge bodies, bad numbers, invalid UTF-8, many unknown ids, poisoned uploads."""

from __future__ import annotations

import asyncio
import http.client
import io
import json
import os
import pickle

import httpx
import psutil
import pytest
import torch
from live_server_util import assert_error, run_server
from safetensors.torch import save

from reliability_util import wait_for, write_store_folder

HIDDEN = 64  # the tiny llama's hidden size
TRAVERSAL_IDS = ["..", "...", "../etc", "%2e%2e", "%2E%2E%2Fetc%2Fpasswd", "..%2f..%2fetc", "%2e%2e%5c%2e%2e",
                 "a%00b", "%00", ".hidden", "-dash", "x" * 129, "%252e%252e", "a%2fb"]
NUM_UNKNOWN = 1000


@pytest.fixture(scope="module")
def live(rel_settings, tmp_path_factory):
    """Small body limits (4 KiB JSON, 64 KiB uploads), few metric labels; the store alone in its folder."""
    store = tmp_path_factory.mktemp("hostile") / "store"
    settings = rel_settings(store=store, max_body_bytes=4096, max_upload_bytes=64 * 1024, metrics_max_tasks=5)
    with run_server(settings) as server:
        with server.client() as c:
            assert c.put("/v1/tasks/ok", json={"init": "random", "num_virtual_tokens": 4}).status_code == 201
        yield server


def _no_escape(live) -> None:
    parent = live.store_dir.parent
    assert [p.name for p in parent.iterdir()] == ["store"]  # nothing written beside the store


def _raw(live, method: str, path: str, body: dict | None = None) -> tuple[int, dict]:
    """Send the path exactly as written (httpx would resolve `..` segments on the client side)."""
    conn = http.client.HTTPConnection(live.url.removeprefix("http://"), timeout=60)
    try:
        payload = None if body is None else json.dumps(body).encode()
        conn.request(method, path, body=payload, headers={"content-type": "application/json"})
        r = conn.getresponse()
        return r.status, json.loads(r.read())
    finally:
        conn.close()


@pytest.mark.parametrize("task_id", TRAVERSAL_IDS)
def test_traversal_ids_in_urls_are_refused(live, task_id):
    gen = {"inputs": "x", "parameters": {"max_new_tokens": 2}}
    calls = [("GET", f"/v1/tasks/{task_id}", None), ("DELETE", f"/v1/tasks/{task_id}", None),
             ("PUT", f"/v1/tasks/{task_id}", {"init": "random", "num_virtual_tokens": 2}),
             ("POST", f"/tasks/{task_id}/generate", gen), ("POST", f"/tasks/{task_id}/generate_stream", gen),
             ("GET", f"/v1/models/{task_id}", None)]
    for method, path, body in calls:
        status, answer = _raw(live, method, path, body)
        assert status in (400, 404, 405), (method, path, status, answer)
        assert set(answer) == {"error", "error_type"}
    _no_escape(live)


@pytest.mark.parametrize("task_id", ["../../etc/passwd", "..", "a/b", "/abs", "a\x00b", "..\\..\\x", "x" * 129])
def test_traversal_ids_in_bodies_are_refused(live, task_id):
    with live.client() as c:
        for r in (c.post("/generate", json={"task_id": task_id, "inputs": "x"}),
                  c.post("/v1/completions", json={"model": task_id, "prompt": "x", "max_tokens": 2})):
            assert r.status_code in (400, 404), r.text
    _no_escape(live)


def test_bodies_over_the_limit_are_413(live):
    big = {"task_id": "ok", "inputs": "x" * 10_000}
    with live.client() as c:
        assert_error(c.post("/generate", json=big), 413, "payload_too_large")

        def chunks():  # no Content-Length: counted as it arrives
            yield b'{"task_id": "ok", "inputs": "'
            for _ in range(100):
                yield b"x" * 1000
            yield b'"}'
        assert_error(c.post("/generate", content=chunks(), headers={"content-type": "application/json"}), 413)
        assert_error(c.put("/v1/tasks/big", files={"config": ("c.json", b"{}"),
                                                   "weights": ("w.safetensors", b"\0" * 100_000)}), 413)


@pytest.mark.parametrize("params", [
    '{"max_new_tokens": 100000000000000000000}', '{"max_new_tokens": -1}', '{"max_new_tokens": 0}',
    '{"max_new_tokens": 1e400}', '{"temperature": NaN}', '{"temperature": Infinity}', '{"temperature": -1}',
    '{"top_p": NaN}', '{"top_p": 2}', '{"top_p": 5e-324}', '{"top_k": -5}', '{"repetition_penalty": NaN}',
    '{"repetition_penalty": Infinity}', '{"seed": -1}', '{"seed": 1e30}', '{"max_new_tokens": "NaN"}',
    '{"stop": ["' + "s" * 10_000 + '"]}', '{"max_new_tokens": 100000}',
    # denormal temperature / penalty overflowed the sampler to NaN: a 500 found by schemathesis
    '{"temperature": 5e-324}', '{"repetition_penalty": 5e-324}', '{"repetition_penalty": 1e308}',
])
def test_bad_numbers_are_422(live, params):
    raw = '{"task_id": "ok", "inputs": "x", "parameters": ' + params + "}"
    with live.client() as c:
        r = c.post("/generate", content=raw.encode(), headers={"content-type": "application/json"})
        assert r.status_code in (413, 422), (params, r.status_code, r.text)
        assert_error(r, r.status_code)


@pytest.mark.parametrize("field", ["temperature", "top_p", "max_tokens", "presence_penalty", "seed"])
@pytest.mark.parametrize("value", ["NaN", "Infinity", "-Infinity", "1e400", "-1", "5e-324"])
def test_openai_bad_numbers_are_4xx(live, field, value):
    raw = f'{{"model": "ok", "prompt": "x", "max_tokens": 2, "{field}": {value}}}'
    if field == "max_tokens":
        raw = f'{{"model": "ok", "prompt": "x", "max_tokens": {value}}}'
    with live.client() as c:
        r = c.post("/v1/completions", content=raw.encode(), headers={"content-type": "application/json"})
    if field in ("max_tokens", "seed") and value == "5e-324":
        assert r.status_code == 422, r.text  # not an integer
    elif field == "presence_penalty" and value == "5e-324":
        assert r.status_code in (200, 422), r.text
    elif field in ("presence_penalty", "seed") and value == "-1":
        assert r.status_code in (200, 422), r.text  # a negative presence penalty is legal in OpenAI's API
    else:
        assert_error(r, 422)


@pytest.mark.parametrize("raw", [b'{"task_id": "ok", "inputs": "\xff\xfe\xfd"}', b'\xff\xfe{"inputs": 1}',
                                 b'{"task_id": "\xc3\x28", "inputs": "x"}', b'{"inputs": "\xed\xa0\x80"}'])
def test_invalid_utf8_is_4xx(live, raw):
    with live.client() as c:
        for path in ("/generate", "/generate_stream", "/v1/completions", "/v1/chat/completions"):
            r = c.post(path, content=raw, headers={"content-type": "application/json"})
            assert 400 <= r.status_code < 500, (path, r.status_code, r.text)
        r = c.get("/v1/tasks/%ff%fe")
        assert r.status_code in (400, 404), r.text


def test_many_unknown_task_ids_keep_memory_flat(live):
    process = psutil.Process(os.getpid())  # uvicorn runs in this process (a thread)

    async def ask(ids: range) -> set[int]:
        async with httpx.AsyncClient(base_url=live.url, timeout=60) as c:
            sem = asyncio.Semaphore(16)

            async def one(i: int) -> int:
                async with sem:
                    r = await c.post("/generate", json={"task_id": f"unknown-{i}", "inputs": "x"})
                    return r.status_code
            return set(await asyncio.gather(*(one(i) for i in ids)))

    assert asyncio.run(ask(range(300))) == {404}  # warm-up
    rss = process.memory_info().rss
    assert asyncio.run(ask(range(300, 300 + NUM_UNKNOWN))) == {404}
    growth = process.memory_info().rss - rss
    assert growth < 16 << 20, growth  # a per-id cache or label would grow without bound
    store = live.runtime.store.stats()
    assert store.device.num_entries + store.host.num_entries <= 2  # no negative cache entries
    with live.client() as c:
        text = c.get("/metrics").text
    assert "unknown-" not in text  # task labels only for real generations, and bounded


def _safetensors(tensor: torch.Tensor, key: str = "prompt_embeddings") -> bytes:
    return save({key: tensor.contiguous()})


def _config(n: int = 4, token_dim: int = HIDDEN) -> bytes:
    return json.dumps({"peft_type": "PROMPT_TUNING", "task_type": "CAUSAL_LM", "num_virtual_tokens": n,
                       "token_dim": token_dim, "num_transformer_submodules": 1}).encode()


def _upload(c, task_id, config: bytes, weights: bytes, name="adapter_model.safetensors") -> httpx.Response:
    return c.put(f"/v1/tasks/{task_id}", files={"config": ("adapter_config.json", config),
                                                "weights": (name, weights)})


@pytest.mark.parametrize("case", ["nan", "inf", "-inf", "rows", "columns", "3d", "1d", "int", "key", "empty"])
def test_bad_uploads_are_422_and_write_nothing(live, case):
    good = torch.randn(4, HIDDEN)
    tensors = {"nan": good.clone().index_fill_(1, torch.tensor([3]), float("nan")),
               "inf": good.clone().index_fill_(0, torch.tensor([1]), float("inf")),
               "-inf": good.clone().index_fill_(0, torch.tensor([1]), float("-inf")),
               "rows": torch.randn(5, HIDDEN), "columns": torch.randn(4, HIDDEN + 1), "3d": torch.randn(1, 4, HIDDEN),
               "1d": torch.randn(4 * HIDDEN), "int": torch.ones(4, HIDDEN, dtype=torch.int32),
               "key": good, "empty": torch.zeros(0, HIDDEN)}
    weights = _safetensors(tensors[case], key="other" if case == "key" else "prompt_embeddings")
    with live.client() as c:
        assert_error(_upload(c, f"bad-{case}", _config(), weights), 422)
        assert_error(c.get(f"/v1/tasks/bad-{case}"), 404)
    assert not (live.store_dir / f"bad-{case}").exists()


class _RunsCode:
    """Unpickling this calls os.mkdir(marker): it must never happen."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def test_pickle_bin_never_runs_code(live, tmp_path):
    marker = tmp_path / "pwned"
    buf = io.BytesIO()
    torch.save({"prompt_embeddings": _RunsCode(str(marker))}, buf)
    payloads = [buf.getvalue(), pickle.dumps({"prompt_embeddings": _RunsCode(str(marker))})]
    with live.client() as c:
        for i, payload in enumerate(payloads):
            assert_error(_upload(c, f"pickle-{i}", _config(), payload, name="adapter_model.bin"), 422)
            # and the same file placed in the store by hand, then used
            write_store_folder(live.store_dir / f"pickled-{i}", _config(), payload, name="adapter_model.bin")
            assert_error(c.post("/generate", json={"task_id": f"pickled-{i}", "inputs": "x"}), 422, "invalid_adapter")
    assert not marker.exists()
    wait_for(lambda: live.runtime.store.stats().pinned == 0)
