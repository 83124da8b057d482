"""/health, /ready, /metrics, /info, request ids and access logs."""

from __future__ import annotations

import json
import logging

from prometheus_client.parser import text_string_to_metric_families

from server.config import Settings
from server.metrics import OTHER_TASKS, Metrics


def samples(text: str) -> dict[tuple[str, tuple], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_health_ready_info(server):
    with server.client() as c:
        assert c.get("/health").json() == {"status": "ok"}
        assert c.get("/ready").json() == {"status": "ready", "model": "tiny"}
        info = c.get("/info").json()
    assert info["model_id"] == "tiny" and info["max_batch_size"] == 16 and info["has_chat_template"]
    assert (info["model_type"], info["task_type"]) == ("llama", "CAUSAL_LM")
    assert info["engine"] == "paged" and info["max_total_tokens"] >= 1
    assert info["kv_block_tokens"] == 16 and info["kv_pool_tokens"] >= info["max_total_tokens"]
    assert info["decode_attention"] in ("native", "sdpa") and isinstance(info["compiled_step"], bool)
    assert info["prefill_attention"] in ("native", "sdpa")


TEXT = "The river runs by the old mill"


def test_metrics_count_requests_tokens_and_store(server):
    with server.client() as c:
        before = samples(c.get("/metrics").text)
        for _ in range(2):
            c.post("/generate", json={"task_id": "task-7", "inputs": TEXT,
                                      "parameters": {"max_new_tokens": 3, "ignore_eos_token": True}})
        c.post("/generate", json={"task_id": "missing-task", "inputs": "x"})
        after_text = c.get("/metrics").text
    after = samples(after_text)

    def delta(name, **labels):
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0) - before.get(key, 0)

    route = {"route": "/generate", "method": "POST"}
    assert delta("promptserve_http_requests_total", **route, status="200") == 2
    assert delta("promptserve_http_requests_total", **route, status="404") == 1
    assert delta("promptserve_generated_tokens_total") == 6
    assert delta("promptserve_task_requests_total", task="task-7") == 2
    assert delta("promptserve_time_to_first_token_seconds_count") == 2
    assert delta("promptserve_request_latency_seconds_count") == 2
    for name in ("promptserve_queue_depth", "promptserve_running_batch_size", "promptserve_prompt_store_hits_total",
                 "promptserve_prompt_store_misses_total", "promptserve_prompt_store_loads_total",
                 "promptserve_prompt_store_evictions_total"):
        assert (name, ()) in after, name
    assert delta("promptserve_prompt_store_hits_total") + delta("promptserve_prompt_store_misses_total") >= 2
    # The engine's KV memory and its prefix cache: the second task-7 request (they ran one after the other)
    # shared the first one's full blocks but the one holding its last position (the first may have shared
    # block 0, all virtual tokens, with earlier tests' task-7 requests), and every block is free again.
    context = 2 + 3 * 7 + len(server.runtime.engine.tokenize(TEXT))
    shared = (context - 1) // 16 * 16
    assert delta("promptserve_prefix_cache_prompt_tokens_total") == 2 * context
    assert shared <= delta("promptserve_prefix_cache_hit_tokens_total") <= shared + 16
    assert after[("promptserve_kv_cache_block_tokens", ())] == 16 and after[("promptserve_kv_cache_bytes", ())] > 0
    assert after[("promptserve_kv_cache_blocks_used", ())] == after[("promptserve_kv_cache_tokens_used", ())] == 0
    assert after[("promptserve_kv_cache_blocks_cached", ())] >= 1


def test_task_label_cardinality_is_capped():
    m = Metrics(max_task_labels=2)
    labels = [m.task_label(t) for t in ("a", "b", "c", "a", "d", None)]
    assert labels == ["a", "b", OTHER_TASKS, "a", OTHER_TASKS, "__base__"]


def test_deleted_task_frees_its_label():
    m = Metrics(max_task_labels=2)
    for task in ("a", "b"):
        m.task_requests.labels(m.task_label(task)).inc()
    m.forget_task("a")
    m.forget_task("never-seen")
    assert m.task_label("c") == "c"  # the freed slot
    assert 'task="a"' not in m.render().decode() and 'task="b"' in m.render().decode()


def test_delete_removes_the_task_series_from_metrics(server):
    with server.client() as c:
        r = c.put("/v1/tasks/short-lived", json={"init": "random", "num_virtual_tokens": 2})
        assert r.status_code == 201, r.text
        assert c.post("/generate", json={"task_id": "short-lived", "inputs": "x",
                                         "parameters": {"max_new_tokens": 1}}).status_code == 200
        key = ("promptserve_task_requests_total", (("task", "short-lived"),))
        assert samples(c.get("/metrics").text)[key] == 1
        assert c.delete("/v1/tasks/short-lived").status_code == 204
        assert key not in samples(c.get("/metrics").text)


def test_request_id_echoed_and_access_log_is_json(server, caplog):
    with caplog.at_level(logging.INFO, logger="promptserve.access"), server.client() as c:
        mine = c.get("/health", headers={"X-Request-Id": "req-abc.1"})
        made = c.post("/generate", json={"task_id": "task-1", "inputs": "x", "parameters": {"max_new_tokens": 1}})
        junk = c.get("/health", headers={"X-Request-Id": "bad id\twith spaces"})
    assert mine.headers["x-request-id"] == "req-abc.1"
    assert len(made.headers["x-request-id"]) == 32 and junk.headers["x-request-id"] != "bad id\twith spaces"
    records = [json.loads(r.getMessage()) for r in caplog.records if r.name == "promptserve.access"]
    gen = next(r for r in records if r["request_id"] == made.headers["x-request-id"])
    assert gen["path"] == "/generate" and gen["status"] == 200 and gen["task_id"] == "task-1"
    assert gen["tenant"] == "anonymous" and gen["duration_ms"] > 0


def test_settings_read_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("PROMPTSERVE_MAX_BATCH_SIZE", "7")
    monkeypatch.setenv("PROMPTSERVE_STORE", str(tmp_path))
    monkeypatch.setenv("PROMPTSERVE_DEMO_TASKS", "false")
    s = Settings()
    assert (s.max_batch_size, s.store, s.demo_tasks, s.port) == (7, tmp_path, False, 8000)
    assert Settings(max_batch_size=3).max_batch_size == 3  # explicit values (flags) win
