"""Fine-tuning through the API, with the real `openai` client against a real server: upload a file,
start a job, poll it, read its events, and serve the task it publishes; a bad line gets a 422 naming it;
a job can be cancelled; other requests are served while a job trains; a restart goes on with a job."""

from __future__ import annotations

import json
import threading
import time

import httpx
import openai
import pytest
from live_server_util import run_server

TRAIN = [{"prompt": f"Question {i}: the river", "completion": " runs past the mill"} for i in range(12)]


def _jsonl(records) -> bytes:
    return "\n".join(json.dumps(r) for r in records).encode()


@pytest.fixture()
def live(make_settings, tmp_path):
    with run_server(make_settings(store=tmp_path / "store", compile=False)) as server:
        yield server


def _client(live) -> openai.OpenAI:
    return openai.OpenAI(base_url=live.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def _wait(client, job_id: str, statuses: set[str], timeout_s: float = 120):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        job = client.fine_tuning.jobs.retrieve(job_id)
        if job.status in statuses:
            return job
        time.sleep(0.2)
    raise AssertionError(f"job {job_id} never reached {statuses}: {job}")


def test_a_job_trains_a_task_and_the_server_serves_it(live):
    with _client(live) as client:
        uploaded = client.files.create(file=("train.jsonl", _jsonl(TRAIN)), purpose="fine-tune")
        assert uploaded.purpose == "fine-tune" and uploaded.bytes == len(_jsonl(TRAIN))
        assert [f.id for f in client.files.list().data] == [uploaded.id]
        job = client.fine_tuning.jobs.create(
            training_file=uploaded.id, model="tiny", hyperparameters={"n_epochs": 2, "batch_size": 4},
            seed=5, extra_body={"task_id": "learned", "prompt_tuning": {"num_virtual_tokens": 4, "init": "text",
                                                                        "init_text": "the river"}})
        assert job.status == "queued" and job.model == "tiny"
        done = _wait(client, job.id, {"succeeded", "failed"})
        assert done.status == "succeeded", done.error
        assert done.fine_tuned_model == "learned" and done.trained_tokens > 0
        messages = [e.message for e in client.fine_tuning.jobs.list_events(job.id, limit=100).data]
        assert any("published task 'learned'" in m for m in messages) and any("step 6/6" in m for m in messages)
        assert client.fine_tuning.jobs.list().data[0].id == job.id
    with live.client() as c:
        task = c.get("/v1/tasks/learned").json()
        assert task["num_virtual_tokens"] == 4
        r = c.post("/generate", json={"task_id": "learned", "inputs": "Question 99: the river",
                                      "parameters": {"max_new_tokens": 4, "details": True}})
        assert r.status_code == 200 and r.json()["details"]["task_version"] == task["version"]


def test_a_bad_line_is_refused_naming_it(live):
    with _client(live) as client:
        with pytest.raises(openai.UnprocessableEntityError) as refused:
            client.files.create(file=("bad.jsonl", _jsonl(TRAIN[:2]) + b'\n{"prompt": "x"}'), purpose="fine-tune")
        assert refused.value.response.json()["error"].startswith('line 3: needs "prompt" and "completion"')
        assert client.files.list().data == []
        with pytest.raises(openai.NotFoundError):
            client.fine_tuning.jobs.create(training_file="file-nope", model="tiny", extra_body={"task_id": "t"})


def test_a_job_can_be_cancelled_and_serving_goes_on_meanwhile(live):
    with _client(live) as client:
        uploaded = client.files.create(file=("train.jsonl", _jsonl(TRAIN * 20)), purpose="fine-tune")
        job = client.fine_tuning.jobs.create(training_file=uploaded.id, model="tiny",
                                             hyperparameters={"n_epochs": 50, "batch_size": 2},
                                             extra_body={"task_id": "never"})
        _wait(client, job.id, {"running"})
        with live.client() as c:  # requests are served while the job trains
            for _ in range(3):
                r = c.post("/generate", json={"inputs": "Hello", "parameters": {"max_new_tokens": 3}})
                assert r.status_code == 200, r.text
        running = client.fine_tuning.jobs.retrieve(job.id)
        assert running.status == "running" and running.model_extra["progress"]["step"] > 0
        client.fine_tuning.jobs.cancel(job.id)
        assert _wait(client, job.id, {"cancelled"}).status == "cancelled"
    with live.client() as c:
        assert c.get("/v1/tasks/never").status_code == 404  # nothing was published


def test_a_restart_goes_on_with_a_running_job(make_settings, tmp_path):
    settings = make_settings(store=tmp_path / "store", compile=False)
    with run_server(settings) as live, _client(live) as client:
        uploaded = client.files.create(file=("train.jsonl", _jsonl(TRAIN * 10)), purpose="fine-tune")
        job = client.fine_tuning.jobs.create(training_file=uploaded.id, model="tiny",
                                             hyperparameters={"n_epochs": 30, "batch_size": 2},
                                             extra_body={"task_id": "resumed"})
        deadline = time.monotonic() + 60
        while client.fine_tuning.jobs.retrieve(job.id).model_extra["progress"]["step"] < 12:
            assert time.monotonic() < deadline
            time.sleep(0.1)
    with run_server(settings) as live, _client(live) as client:  # the same folders: a restarted server
        messages = [e.message for e in client.fine_tuning.jobs.list_events(job.id, limit=1000).data]
        assert any("restarted" in m for m in messages)
        resumed_from = [m for m in messages if m.startswith("training from step")]
        assert resumed_from and resumed_from[0] != "training from step 0", messages  # newest first
        client.fine_tuning.jobs.cancel(job.id)
        assert _wait(client, job.id, {"cancelled"}).status == "cancelled"


def test_files_and_jobs_are_the_tenants_own(make_settings, tmp_path):
    keys = tmp_path / "keys.yaml"
    keys.write_text(json.dumps({"keys": [{"key": "key-a-000001", "tenant": "a", "tasks": ["a-*"], "admin": True},
                                         {"key": "key-b-000001", "tenant": "b", "tasks": ["b-*"], "admin": True},
                                         {"key": "key-u-000001", "tenant": "u", "tasks": ["*"]}]}))
    with run_server(make_settings(store=tmp_path / "store", compile=False, api_keys=keys)) as live:
        def client(key):
            return openai.OpenAI(base_url=live.url + "/v1", api_key=key, max_retries=0, timeout=60)

        with client("key-a-000001") as a, client("key-b-000001") as b, client("key-u-000001") as user:
            mine = a.files.create(file=("t.jsonl", _jsonl(TRAIN)), purpose="fine-tune")
            assert b.files.list().data == []
            with pytest.raises(openai.NotFoundError):
                b.files.retrieve(mine.id)
            with pytest.raises(openai.NotFoundError):  # b cannot train on a's file
                b.fine_tuning.jobs.create(training_file=mine.id, model="tiny", extra_body={"task_id": "b-x"})
            with pytest.raises(openai.PermissionDeniedError):  # a writes only a-* tasks
                a.fine_tuning.jobs.create(training_file=mine.id, model="tiny", extra_body={"task_id": "b-x"})
            with pytest.raises(openai.PermissionDeniedError):  # a key that may not write tasks at all
                user.fine_tuning.jobs.create(training_file=mine.id, model="tiny", extra_body={"task_id": "u-x"})
            job = a.fine_tuning.jobs.create(training_file=mine.id, model="tiny",
                                            hyperparameters={"n_epochs": 1, "batch_size": 4},
                                            extra_body={"task_id": "a-task"})
            with pytest.raises(openai.NotFoundError):
                b.fine_tuning.jobs.retrieve(job.id)
            assert b.fine_tuning.jobs.list().data == []
            assert _wait(a, job.id, {"succeeded", "failed"}).status == "succeeded"


def test_events_stream_as_sse_until_the_job_ends(live):
    with _client(live) as client:
        uploaded = client.files.create(file=("train.jsonl", _jsonl(TRAIN)), purpose="fine-tune")
        job = client.fine_tuning.jobs.create(training_file=uploaded.id, model="tiny",
                                             hyperparameters={"n_epochs": 2, "batch_size": 4},
                                             extra_body={"task_id": "streamed"})
    messages = []
    with live.client() as c, c.stream("GET", f"/v1/fine_tuning/jobs/{job.id}/events", params={"stream": "true"},
                                      timeout=120) as s:
        assert s.headers["content-type"].startswith("text/event-stream")
        for line in s.iter_lines():
            if line.startswith("data: "):
                messages.append(line[6:])
    assert messages[-1] == "[DONE]"
    texts = [json.loads(m)["message"] for m in messages[:-1]]
    assert texts[0].startswith("job queued") and texts[-1].startswith("published task 'streamed'"), texts


def test_the_train_command_trains_a_task_and_exits_when_it_is_served(live, tmp_path):
    import subprocess
    import sys

    data = tmp_path / "train.jsonl"
    data.write_bytes(_jsonl(TRAIN))
    done = subprocess.run([sys.executable, "-m", "server.cli", "train", "--data", str(data), "--task", "cli-task",
                           "--url", live.url, "--epochs", "1", "--batch-size", "4", "--virtual-tokens", "3"],
                          capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "task 'cli-task' is served" in done.stderr
    with live.client() as c:
        assert c.get("/v1/tasks/cli-task").json()["num_virtual_tokens"] == 3
    data.write_bytes(b'{"prompt": "no completion"}\n')
    refused = subprocess.run([sys.executable, "-m", "server.cli", "train", "--data", str(data), "--task", "x",
                              "--url", live.url], capture_output=True, text=True, timeout=60)
    assert refused.returncode == 1 and "line 1" in refused.stderr and "422" in refused.stderr
