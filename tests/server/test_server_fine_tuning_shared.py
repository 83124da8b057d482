"""Training on a shared store: two real servers (uvicorn on loopback, an engine each) share one store
folder, with the real `openai` client. A job made on either runs on exactly one, the server holding the
owner lock; both serve the task it publishes; a cancel asked of the other server stops it; when the owner
stops, the other takes its jobs over and resumes the running one from its checkpoint."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import time

import openai
import pytest

from live_server_util import run_server
from test_server_fine_tuning import TRAIN, _client, _jsonl, _wait


def _owner(*servers):
    return [s for s in servers if s.app.state.training.runner.is_owner]


def _messages(client, job_id: str) -> list[str]:
    """Oldest first."""
    return [e.message for e in reversed(client.fine_tuning.jobs.list_events(job_id, limit=1000).data)]


def _wait_for_step(client, job_id: str, step: int) -> None:
    deadline = time.monotonic() + 120
    while client.fine_tuning.jobs.retrieve(job_id).model_extra["progress"]["step"] < step:
        assert time.monotonic() < deadline, client.fine_tuning.jobs.retrieve(job_id)
        time.sleep(0.1)


def _wait_for_message_after(client, job_id: str, part: str) -> str:
    """The job's first event after the first one containing `part`, once it is written."""
    deadline = time.monotonic() + 60
    while True:
        messages = _messages(client, job_id)
        found = [i for i, m in enumerate(messages) if part in m]
        if found and found[0] + 1 < len(messages):
            return messages[found[0] + 1]
        assert time.monotonic() < deadline, messages
        time.sleep(0.1)


def test_a_job_made_on_either_server_runs_on_the_owner_and_both_serve_it(make_settings, tmp_path):
    def settings():
        return make_settings(store=tmp_path / "store", compile=False, shared_store=True)

    with run_server(settings()) as first, run_server(settings()) as second:
        assert _owner(first, second) == [first]  # the first to start took the lock
        with _client(second) as client:  # every call goes to the server that does not train
            uploaded = client.files.create(file=("train.jsonl", _jsonl(TRAIN)), purpose="fine-tune")
            job = client.fine_tuning.jobs.create(
                training_file=uploaded.id, model="tiny", hyperparameters={"n_epochs": 2, "batch_size": 4},
                seed=3, extra_body={"task_id": "shared", "prompt_tuning": {"num_virtual_tokens": 4}})
            done = _wait(client, job.id, {"succeeded", "failed"})
            assert done.status == "succeeded", done.error
            messages = _messages(client, job.id)
            assert messages[0].startswith("job queued")
            assert [m for m in messages if m.startswith("training from step")] == [messages[1]]  # run once
            assert messages[-1].startswith("published task 'shared'")
        with first.client() as c:
            version = c.get("/v1/tasks/shared").json()["version"]
        for server in (first, second):  # the store is shared: the new task is served by both
            with server.client() as c:
                r = c.post("/generate", json={"task_id": "shared", "inputs": "Question 99: the river",
                                              "parameters": {"max_new_tokens": 3, "details": True}})
                assert r.status_code == 200 and r.json()["details"]["task_version"] == version, r.text

        with _client(second) as client:  # a cancel asked of the server that does not run the job
            job = client.fine_tuning.jobs.create(training_file=uploaded.id, model="tiny",
                                                 hyperparameters={"n_epochs": 100, "batch_size": 1},
                                                 extra_body={"task_id": "never"})
            _wait_for_step(client, job.id, 1)
            client.fine_tuning.jobs.cancel(job.id)
            assert _wait(client, job.id, {"cancelled", "succeeded", "failed"}).status == "cancelled"
        with second.client() as c:
            assert c.get("/v1/tasks/never").status_code == 404
        assert _owner(first, second) == [first]


def test_the_other_server_takes_the_jobs_over_when_the_owner_stops(make_settings, tmp_path):
    def settings():
        return make_settings(store=tmp_path / "store", compile=False, shared_store=True)

    with contextlib.ExitStack() as owner_running:
        owner = owner_running.enter_context(run_server(settings()))
        with run_server(settings()) as other, _client(other) as client:
            assert _owner(owner, other) == [owner]
            uploaded = client.files.create(file=("train.jsonl", _jsonl(TRAIN * 10)), purpose="fine-tune")
            running = client.fine_tuning.jobs.create(training_file=uploaded.id, model="tiny",
                                                     hyperparameters={"n_epochs": 30, "batch_size": 2},
                                                     extra_body={"task_id": "moved"})
            queued = client.fine_tuning.jobs.create(training_file=uploaded.id, model="tiny",
                                                    hyperparameters={"n_epochs": 1, "batch_size": 8},
                                                    extra_body={"task_id": "after"})
            _wait_for_step(client, running.id, 12)  # past its checkpoint at step 10
            owner_running.close()  # the owner stops (its lock goes with it) while the job runs
            deadline = time.monotonic() + 30
            while not _owner(other):
                assert time.monotonic() < deadline, "the other server never took the jobs over"
                time.sleep(0.1)
            resumed = _wait_for_message_after(client, running.id, "restarted")  # it trains on here
            assert resumed.startswith("training from step") and resumed != "training from step 0", resumed
            client.fine_tuning.jobs.cancel(running.id)
            assert _wait(client, running.id, {"cancelled", "succeeded", "failed"}).status == "cancelled"
            done = _wait(client, queued.id, {"succeeded", "failed", "cancelled"})
            assert done.status == "succeeded", done.error  # the queued job was taken over too
            assert _messages(client, queued.id)[-1].startswith("published task 'after'")


def test_a_store_that_cannot_lock_refuses_jobs_saying_why(make_settings, tmp_path, monkeypatch):
    def no_locks(fd, operation):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)  # as on NFS mounted without locking
    with run_server(make_settings(store=tmp_path / "store", compile=False, shared_store=True)) as live, \
            _client(live) as client:
        uploaded = client.files.create(file=("train.jsonl", _jsonl(TRAIN)), purpose="fine-tune")
        with pytest.raises(openai.APIStatusError) as refused:
            client.fine_tuning.jobs.create(training_file=uploaded.id, model="tiny", extra_body={"task_id": "t"})
    assert refused.value.status_code == 503
    assert "No locks available" in refused.value.response.json()["error"]
    assert "file locking" in refused.value.response.json()["error"]
