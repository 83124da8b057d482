"""Hostile tenants, round two (issue 23): training through the API, against a real server. Training runs in
bounded slices and never tokenizes on the engine's thread or the request pool; examples must fit the model's
positions; per-tenant limits hold under concurrent requests; files have a quota and expire; event streams
and jobs' wall-clock time are bounded."""

from __future__ import annotations

import concurrent.futures as cf
import json
import threading

import httpx
import pytest
import yaml
from live_server_util import assert_error, run_server

from reliability_util import wait_for

ACME = {"Authorization": "Bearer hrt-acme-admin-01"}
GLOBEX = {"Authorization": "Bearer hrt-globex-admin1"}
KEYS = [{"key": "hrt-acme-admin-01", "tenant": "acme", "tasks": ["acme-*"], "admin": True},
        {"key": "hrt-globex-admin1", "tenant": "globex", "tasks": ["globex-*"], "admin": True}]
TRAIN = [{"prompt": f"Question {i}: the river", "completion": " runs past the mill"} for i in range(64)]
MAX_FILES = 3


def jsonl(records) -> bytes:
    return "\n".join(json.dumps(r) for r in records).encode()


def upload(c: httpx.Client, data: bytes) -> httpx.Response:
    return c.post("/v1/files", data={"purpose": "fine-tune"}, files={"file": ("train.jsonl", data)})


def create_job(c: httpx.Client, file_id: str, task: str, *, validation: str | None = None, num_virtual_tokens: int = 4,
               **hyper) -> httpx.Response:
    body = {"training_file": file_id, "model": "tiny", "task_id": task, "hyperparameters": hyper, "seed": 1,
            "prompt_tuning": {"num_virtual_tokens": num_virtual_tokens}}
    if validation is not None:
        body["validation_file"] = validation
    return c.post("/v1/fine_tuning/jobs", json=body)


def wait_job(c: httpx.Client, job_id: str, statuses: set[str], timeout_s: float = 120) -> dict:
    found = {}

    def ended() -> bool:
        found.update(c.get(f"/v1/fine_tuning/jobs/{job_id}").json())
        return found.get("status") in statuses
    wait_for(ended, timeout_s, f"job {job_id} to reach {statuses}")
    return found


@pytest.fixture(scope="module")
def live(rel_settings, tmp_path_factory):
    keys = tmp_path_factory.mktemp("hrt-keys") / "keys.yaml"
    keys.write_text(yaml.safe_dump({"keys": KEYS}))
    with run_server(rel_settings(api_keys=keys, training_max_jobs_per_tenant=2,
                                 training_max_files_per_tenant=MAX_FILES)) as server:
        yield server


@pytest.fixture()
def fresh(live):
    """Each test starts with no files and no job of acme's left running."""
    yield
    with live.client(headers=ACME) as c:
        for job in c.get("/v1/fine_tuning/jobs", params={"limit": 100}).json()["data"]:
            if job["status"] in ("queued", "running"):
                c.post(f"/v1/fine_tuning/jobs/{job['id']}/cancel")
        for f in c.get("/v1/files").json()["data"]:
            c.delete(f"/v1/files/{f['id']}")
        wait_for(lambda: all(j["status"] not in ("queued", "running")
                             for j in c.get("/v1/fine_tuning/jobs", params={"limit": 100}).json()["data"]))


def test_training_runs_in_bounded_slices_off_the_engine_thread(live, fresh, monkeypatch):
    """A batch of 64 trained (and a validation file of 64 evaluated) in one forward held every request for
    the whole of it; tokenizing a file on the engine thread or the request pool held them too."""
    rows, threads = [], set()
    model, tokenizer = live.runtime.loaded.model, live.runtime.tokenizer

    def on_forward(module, args, kwargs):
        if "labels" in kwargs:  # a training or validation forward (serving passes no labels)
            rows.append(kwargs["inputs_embeds"].shape[0])

    real_call = type(tokenizer).__call__

    def recording_call(self, *args, **kwargs):
        threads.add(threading.current_thread().name)
        return real_call(self, *args, **kwargs)

    monkeypatch.setattr(type(tokenizer), "__call__", recording_call)
    hook = model.register_forward_pre_hook(on_forward, with_kwargs=True)
    try:
        with live.client(headers=ACME) as c:
            train, valid = (upload(c, jsonl(TRAIN)).json()["id"] for _ in range(2))
            job = create_job(c, train, "acme-sliced", validation=valid, n_epochs=1, batch_size=64).json()
            done = wait_job(c, job["id"], {"succeeded", "failed"})
    finally:
        hook.remove()
    assert done["status"] == "succeeded", done["error"]
    assert done["valid_loss"] is not None and done["progress"]["step"] == 1
    assert rows and max(rows) <= 8 and sum(rows) == 128, rows  # 64 trained + 64 evaluated, 8 at a time at most
    assert "promptserve-engine" not in threads and not any(t.startswith("asyncio_") for t in threads), threads
    assert any(t.startswith("promptserve-upload-check") for t in threads), threads


@pytest.mark.parametrize("hyper", [{"batch_size": 10**6}, {"batch_size": 257}, {"n_epochs": 101},
                                   {"learning_rate": 1e9}, {"batch_size": 0}])
def test_hyperparameters_are_bounded(live, fresh, hyper):
    with live.client(headers=ACME) as c:
        file_id = upload(c, jsonl(TRAIN[:4])).json()["id"]
        assert_error(create_job(c, file_id, "acme-bounded", **hyper), 422)


def test_examples_must_fit_the_models_positions(live, fresh):
    """The tiny model has 512 positions: on a GPU an index past them is a device-side assert that breaks
    the whole process's CUDA context."""
    long_line = {"prompt": "x" * 700, "completion": " y"}
    with live.client(headers=ACME) as c:
        body = assert_error(upload(c, jsonl([TRAIN[0], long_line])), 422, "invalid_training_file")
        assert "line 2" in body["error"], body
        near = upload(c, jsonl([{"prompt": "x" * 495, "completion": " y"}]))  # fits alone, not behind 20 tokens
        assert near.status_code == 200, near.text
        body = assert_error(create_job(c, near.json()["id"], "acme-long", num_virtual_tokens=20), 422)
        assert "positions" in body["error"], body
        assert create_job(c, near.json()["id"], "acme-long", num_virtual_tokens=2).status_code == 200


def test_concurrent_creates_keep_the_per_tenant_job_limit(live, fresh):
    with live.client(headers=ACME) as c:
        file_id = upload(c, jsonl(TRAIN)).json()["id"]

    def create(i: int) -> int:
        with live.client(headers=ACME) as c:
            return create_job(c, file_id, f"acme-many-{i}", n_epochs=100, batch_size=1).status_code
    with cf.ThreadPoolExecutor(12) as pool:
        statuses = list(pool.map(create, range(12)))
    assert sorted(statuses) == [200, 200] + [429] * 10, statuses


def test_event_streams_are_bounded_per_tenant(live, fresh):
    with live.client(headers=ACME) as c:
        file_id = upload(c, jsonl(TRAIN)).json()["id"]
        job_id = create_job(c, file_id, "acme-streamed", n_epochs=100, batch_size=1).json()["id"]
    path = f"/v1/fine_tuning/jobs/{job_id}/events"
    clients = [live.client(headers=ACME) for _ in range(5)]
    try:
        streams = [cl.stream("GET", path, params={"stream": "true"}) for cl in clients[:4]]
        for stream in streams:
            assert stream.__enter__().status_code == 200
        assert_error(clients[4].get(path, params={"stream": "true"}), 429, "rate_limited")
        assert clients[4].get(path).status_code == 200  # polling is not limited
        with live.client(headers=GLOBEX) as other:  # another tenant's own streams are its own
            assert other.get(path).status_code == 404
        for stream in streams:
            stream.__exit__(None, None, None)
        wait_for(lambda: _opens(clients[4], path), what="a stream slot freed by the closed streams")
    finally:
        for cl in clients:
            cl.close()


def _opens(c: httpx.Client, path: str) -> bool:
    with c.stream("GET", path, params={"stream": "true"}) as r:
        return r.status_code == 200


def test_each_tenant_keeps_a_bounded_number_of_files(live, fresh):
    with live.client(headers=ACME) as c:
        ids = [upload(c, jsonl(TRAIN[:2])).json()["id"] for _ in range(MAX_FILES)]
        assert_error(upload(c, jsonl(TRAIN[:2])), 429, "quota_exceeded")
        with live.client(headers=GLOBEX) as other:
            r = upload(other, jsonl(TRAIN[:2]))
            assert r.status_code == 200 and other.delete(f"/v1/files/{r.json()['id']}").status_code == 200
        assert c.delete(f"/v1/files/{ids[0]}").status_code == 200
        assert upload(c, jsonl(TRAIN[:2])).status_code == 200


def test_files_expire_and_jobs_stop_at_their_wall_clock_limit(rel_settings, tmp_path):
    settings = rel_settings(store=tmp_path / "store", training_file_ttl_s=2, training_max_job_s=1)
    with run_server(settings) as server, server.client() as c:
        file_id = upload(c, jsonl(TRAIN)).json()["id"]
        job = create_job(c, file_id, "long", n_epochs=100, batch_size=1).json()
        done = wait_job(c, job["id"], {"succeeded", "failed", "cancelled"})
        assert done["status"] == "failed" and done["error"]["code"] == "time_limit", done
        assert upload(c, jsonl(TRAIN[:2])).json()["expires_at"] > 0
        wait_for(lambda: c.get(f"/v1/files/{file_id}").status_code == 404, what="the file to expire")
        assert file_id not in {f["id"] for f in c.get("/v1/files").json()["data"]}
        files = tmp_path / "store" / ".training" / "files"
        wait_for(lambda: not any(p.name.startswith(file_id) for p in files.iterdir()), 30, "the expired file deleted")
