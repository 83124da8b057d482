"""Hostile tenants, round two (issue 23): training when the process or its disk fails. A job that keeps
killing its server is failed, not resumed forever; a full disk leaves nothing half-written; a read-only
store still serves; an ending the disk refuses never leaves a job `running`; a planted checkpoint runs no
code. Real servers (subprocesses where one must die or be limited), real file systems."""

from __future__ import annotations

import json
import resource
import signal
import subprocess
import sys

import httpx
import torch
from live_server_util import assert_error, free_port, run_server, wait_for_process
from safetensors.torch import save

from reliability_util import read_only, wait_for
from test_reliability_hostile import _RunsCode
from test_reliability_hostile_training import TRAIN, create_job, jsonl, upload, wait_job

FILE_SIZE_LIMIT = 256 * 1024  # RLIMIT_FSIZE of the disk-full server: any larger write fails with EFBIG


def _start(model, store, *, file_size_limit: int | None = None) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [sys.executable, "-m", "server.cli", "serve", "--model", str(model), "--port", str(port), "--store",
           str(store), "--device", "cpu", "--served-model-name", "tiny", "--shutdown-grace-s", "1"]

    def limit_files():  # the kernel refuses writes past the limit, as a full disk refuses them
        resource.setrlimit(resource.RLIMIT_FSIZE, (file_size_limit, file_size_limit))
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            preexec_fn=limit_files if file_size_limit else None)
    url = f"http://127.0.0.1:{port}"
    wait_for_process(url, proc)
    return proc, url


def _kill(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    proc.stderr.close()


def test_a_job_that_keeps_killing_its_server_fails_instead_of_resuming(tiny_model_dir, rel_settings, tmp_path):
    """A step that gets the process OOM-killed ran again at every restart: a crash loop."""
    model, store = tiny_model_dir("llama"), tmp_path / "store"
    proc, url = _start(model, store)
    try:
        with httpx.Client(base_url=url, timeout=60) as c:
            file_id = upload(c, jsonl(TRAIN)).json()["id"]
            job_id = create_job(c, file_id, "killer", n_epochs=100, batch_size=1).json()["id"]
            wait_job(c, job_id, {"running"})
    finally:
        _kill(proc)
    for _ in range(2):  # restarted twice, killed again while the job runs
        proc, url = _start(model, store)
        try:
            assert httpx.get(f"{url}/v1/fine_tuning/jobs/{job_id}", timeout=30).json()["status"] == "running"
        finally:
            _kill(proc)
    with run_server(rel_settings(store=store)) as live, live.client() as c:  # the third restart
        job = c.get(f"/v1/fine_tuning/jobs/{job_id}").json()
        assert job["status"] == "failed" and job["error"]["code"] == "server_crashed", job
        events = [e["message"] for e in c.get(f"/v1/fine_tuning/jobs/{job_id}/events", params={"limit": 100}).json()["data"]]
        assert sum("crash" in m for m in events) == 2 and "without shutting down 3 times" in events[0], events


def test_a_full_disk_leaves_nothing_half_written(tiny_model_dir, tmp_path):
    store = tmp_path / "store"
    big_file = jsonl([{"prompt": "x" * 80, "completion": " y"}] * 3500)  # about 380 KB
    big_adapter = save({"prompt_embeddings": torch.randn(512, 64, dtype=torch.float64)})  # 262 KB
    config = json.dumps({"peft_type": "PROMPT_TUNING", "task_type": "CAUSAL_LM", "num_virtual_tokens": 512,
                         "token_dim": 64}).encode()
    proc, url = _start(tiny_model_dir("llama"), store, file_size_limit=FILE_SIZE_LIMIT)
    try:
        with httpx.Client(base_url=url, timeout=120) as c:
            assert_error(upload(c, big_file), 503, "storage_unavailable")
            r = c.put("/v1/tasks/big", files={"config": ("adapter_config.json", config),
                                              "weights": ("adapter_model.safetensors", big_adapter)})
            assert_error(r, 503, "storage_unavailable")
            assert c.get("/v1/files").json()["data"] == [] and c.get("/v1/tasks/big").status_code == 404
            assert upload(c, jsonl(TRAIN[:2])).status_code == 200  # a small one still fits
    finally:
        _kill(proc)
    leftovers = [p.name for p in (store / ".training" / "files").iterdir() if not p.name.endswith((".json", ".jsonl"))]
    assert leftovers == [] and len(list((store / ".training" / "files").iterdir())) == 2, leftovers
    assert [p.name for p in store.iterdir() if p.name.startswith(".tmp")] == []


def test_a_read_only_store_still_serves_with_training_off(rel_settings, tmp_path):
    store = tmp_path / "store"
    with run_server(rel_settings(store=store)) as live, live.client() as c:
        assert c.put("/v1/tasks/kept", json={"init": "random", "num_virtual_tokens": 4}).status_code == 201
    for folder in (".training", ".usage"):  # as a store copied in by an operator, mounted read-only
        subprocess.run(["rm", "-rf", str(store / folder)], check=True)
    with read_only(store), run_server(rel_settings(store=store)) as live, live.client() as c:
        r = c.post("/generate", json={"task_id": "kept", "inputs": "x", "parameters": {"max_new_tokens": 2}})
        assert r.status_code == 200, r.text
        body = assert_error(upload(c, jsonl(TRAIN[:2])), 503, "unavailable")
        assert "training is off" in body["error"] and str(store) not in body["error"], body
        assert_error(c.get("/v1/fine_tuning/jobs"), 503)


def test_an_ending_the_disk_refuses_never_leaves_a_job_running(rel_settings, tmp_path):
    store = tmp_path / "store"
    with run_server(rel_settings(store=store, training_max_jobs_per_tenant=1)) as live, live.client() as c:
        file_id = upload(c, jsonl(TRAIN)).json()["id"]
        job_id = create_job(c, file_id, "doomed", n_epochs=100, batch_size=1).json()["id"]
        wait_job(c, job_id, {"running"})
        jobs = store / ".training" / "jobs"
        with read_only(jobs):  # its next checkpoint or progress save fails, and so does writing the ending
            job = wait_job(c, job_id, {"failed", "succeeded", "cancelled"})
            assert job["status"] == "failed", job
            assert json.loads((jobs / f"{job_id}.json").read_text())["status"] == "running"  # not written yet
        wait_for(lambda: json.loads((jobs / f"{job_id}.json").read_text())["status"] == "failed",
                 what="the ending written once the disk takes it")
        r = create_job(c, file_id, "next", n_epochs=1, batch_size=8)  # the tenant's one job slot is free
        assert r.status_code == 200, r.text


def test_a_planted_checkpoint_runs_no_code(rel_settings, tmp_path):
    store, marker = tmp_path / "store", tmp_path / "pwned"
    with run_server(rel_settings(store=store)) as live, live.client() as c:
        file_id = upload(c, jsonl(TRAIN)).json()["id"]
        job_id = create_job(c, file_id, "planted", n_epochs=100, batch_size=1).json()["id"]
        wait_job(c, job_id, {"running"})
    torch.save({"prompt": _RunsCode(str(marker))}, store / ".training" / "jobs" / f"{job_id}.ckpt")
    with run_server(rel_settings(store=store)) as live, live.client() as c:
        job = wait_job(c, job_id, {"failed", "succeeded"})
    assert job["status"] == "failed" and "Weights only load failed" in job["error"]["message"], job
    assert not marker.exists()
