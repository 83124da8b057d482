"""`promptserve serve` as a user starts it: a subprocess on the tiny demo model (demo-tiny), stopped by SIGTERM."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
from live_server_util import free_port, wait_for_process

from server.cli import main
from server.preloads import intel_openmp_library

ISSUE_FLAGS = ("--model", "--store", "--host", "--port", "--device", "--dtype", "--max-batch-size", "--max-queue",
               "--max-input-tokens", "--max-new-tokens", "--api-keys")


def test_help_documents_every_flag_and_its_env(capsys):
    try:
        main(["--help"])
    except SystemExit as e:
        assert e.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for flag in ISSUE_FLAGS:
        assert flag in text, flag
        assert "PROMPTSERVE_" + flag[2:].replace("-", "_").upper() in text, flag
    assert "loadtest" in text


def test_serve_demo_model_subprocess(tmp_path):
    port = free_port()
    env = {**os.environ, "PROMPTSERVE_PORT": str(port), "PROMPTSERVE_MAX_BATCH_SIZE": "4"}
    cmd = [sys.executable, "-m", "server.cli", "serve", "--model", "demo-tiny", "--store", str(tmp_path / "prompts"),
           "--demo-cache-dir", str(tmp_path / "cache")]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        if proc.poll() is None:
            try:
                wait_for_process(url, proc)
            except RuntimeError:
                pass  # the assertion below shows the server's stderr
        assert proc.poll() is None, proc.communicate()[1]
        tasks = httpx.get(url + "/v1/tasks").json()["tasks"]
        assert [t["id"] for t in tasks] == ["demo-poet", "demo-support"]
        assert httpx.get(url + "/info").json()["max_batch_size"] == 4  # from the environment
        r = httpx.post(url + "/generate", json={"task_id": "demo-poet", "inputs": "The sea",
                                                "parameters": {"max_new_tokens": 4}}, timeout=60)
        assert r.status_code == 200 and r.json()["details"]["virtual_tokens"] == 8
        # The same pid re-executed itself with Intel's OpenMP preloaded (server/preloads.py), when installed.
        maps = Path(f"/proc/{proc.pid}/maps").read_text()
        assert (intel_openmp_library() is None) or str(intel_openmp_library()) in maps
    finally:
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    # SIGTERM is the normal way to stop a server: a graceful stop exits 0 (server/graceful.py).
    assert proc.returncode == 0, err
    assert "promptserve: stopped" in err and "Traceback" not in err
    assert "engine warm-up took" in err  # printed before /ready
    assert '"path":"/generate","status":200' in out  # the JSON access log, on stdout
    assert (tmp_path / "cache").is_dir() and (tmp_path / "prompts" / "demo-poet").is_dir()


def test_bad_keys_file_stops_before_loading(tmp_path, capsys):
    keys = tmp_path / "keys.yaml"
    keys.write_text("- key: sk-super-secret-1\n  tenant: t\n  unknown_field: 1\n")
    assert main(["serve", "--api-keys", str(keys), "--store", str(tmp_path / "p"), "--port", "1"]) == 2
    err = capsys.readouterr().err
    assert "entry 0" in err and "sk-super-secret-1" not in err
