"""schemathesis against the server's own OpenAPI schema, every operation, with and without keys.

Checks: no 5xx, every status documented for its operation, and every documented response valid against
the schema. Bounded for CI (a few examples per operation);
`PROMPTSERVE_FUZZ_EXAMPLES=50 PROMPTSERVE_FUZZ_PHASES=examples,coverage,fuzzing,stateful` runs the long version.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from live_server_util import run_server

from reliability_util import TASKS, TENANT_TASKS, create_tasks, keys_file

import schemathesis  # noqa: E402,F401  (a test dependency: fail loudly if it is missing, never skip)
EXAMPLES = os.environ.get("PROMPTSERVE_FUZZ_EXAMPLES", "3")
PHASES = os.environ.get("PROMPTSERVE_FUZZ_PHASES", "fuzzing")
MAX_TIME = os.environ.get("PROMPTSERVE_FUZZ_MAX_TIME", "8")  # seconds per run
CHECKS = "not_a_server_error,status_code_conformance,response_schema_conformance"


@pytest.fixture(scope="module")
def fuzz_servers(rel_settings, tmp_path_factory):
    """Own servers (the fuzzer creates and deletes tasks): (plain, with keys), each with tasks."""
    with run_server(rel_settings()) as plain, \
            run_server(rel_settings(api_keys=keys_file(tmp_path_factory))) as keyed:
        create_tasks(plain, TASKS[:2])
        create_tasks(keyed, TENANT_TASKS, headers={"Authorization": "Bearer rel-admin-key-1"})
        yield plain, keyed


def fuzz(schema: Path, url: str, *headers: str, extra: tuple[str, ...] = (),
         examples: str = EXAMPLES) -> subprocess.CompletedProcess:
    exe = shutil.which("schemathesis", path=os.path.dirname(sys.executable)) or "schemathesis"
    # The schema from a file: with keys set, /openapi.json itself needs one (and the no-key run must still
    # know every route to send its requests to).
    cmd = [exe, "run", str(schema), "--url", url, "--checks", CHECKS,
           "--max-examples", examples, "--phases", PHASES, "--max-time", MAX_TIME, "--workers", "2",
           "--request-timeout", "60", "--seed", "7", "--suppress-health-check", "all", *extra]
    for h in headers:
        cmd += ["--header", h]
    return subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def schema_file(fuzz_servers, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("fuzz-schema") / "openapi.json"
    path.write_text(httpx.get(f"{fuzz_servers[0].url}/openapi.json", timeout=10).text)
    return path


def test_fuzz_without_auth(fuzz_servers, schema_file):
    result = fuzz(schema_file, fuzz_servers[0].url)
    assert result.returncode == 0, result.stdout[-6000:]
    num = _num_operations(schema_file)  # every route in the schema was fuzzed
    assert f"Selected: {num}/{num}" in result.stdout, result.stdout[-3000:]


def _num_operations(schema: Path) -> int:
    paths = json.loads(schema.read_text())["paths"]
    return sum(1 for methods in paths.values() for method in methods if method in ("get", "post", "put", "delete"))


@pytest.mark.parametrize("key", ["rel-admin-key-1", "rel-globex-key1", None])
def test_fuzz_with_auth(fuzz_servers, schema_file, key):
    result = fuzz(schema_file, fuzz_servers[1].url, *([f"Authorization: Bearer {key}"] if key else []))
    assert result.returncode == 0, result.stdout[-6000:]


@pytest.mark.parametrize("key", ["rel-admin-key-1", "rel-globex-key1"])
def test_fuzz_training_and_usage_routes_longer(fuzz_servers, schema_file, key):
    """Issue 23: uploads, jobs, events and usage, with more examples each than the whole-schema runs."""
    result = fuzz(schema_file, fuzz_servers[1].url, f"Authorization: Bearer {key}", examples="15",
                  extra=("--include-path-regex", "^/v1/(files|fine_tuning|usage)"))
    assert result.returncode == 0, result.stdout[-6000:]
    assert "Selected: 0/" not in result.stdout, result.stdout[-3000:]


def _bodies() -> dict[str, bytes]:
    """Hostile bodies: deep, wide, huge, and long strings, each a valid JSON document (or nearly)."""
    wide_object = "{" + ",".join(f'"k{i}": {i}' for i in range(60_000)) + "}"
    return {"deep-list": b"[" * 200_000 + b"]" * 200_000, "deep-object": b'{"a":' * 100_000 + b"1" + b"}" * 100_000,
            "wide-object": wide_object.encode(), "wide-list": ("[" + ",".join(["0"] * 300_000) + "]").encode(),
            "huge": b'{"inputs": "' + b"x" * (3 << 20) + b'"}', "long-strings": json.dumps(
                {"inputs": "x" * 900_000, "task_id": "y" * 50_000, "model": "z" * 50_000}).encode(),
            "numbers": b'{"inputs": "x", "parameters": {"max_new_tokens": 1' + b"0" * 5000 + b"}}"}


@pytest.mark.parametrize("key", ["rel-admin-key-1", None])
def test_deep_wide_and_huge_bodies_are_4xx_on_every_route(fuzz_servers, schema_file, key):
    live = fuzz_servers[1]
    headers = {"content-type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
    paths = json.loads(schema_file.read_text())["paths"]
    targets = [(m, p.replace("{task_id}", "globex-x").replace("{model_id}", "globex-x").replace("{file_id}", "file-x")
                .replace("{job_id}", "ftjob-x")) for p, methods in paths.items() for m, op in methods.items()
               if "requestBody" in op]
    assert len(targets) >= 10, targets
    with httpx.Client(base_url=live.url, timeout=120, headers=headers) as c:
        for name, body in _bodies().items():
            for method, path in targets:
                r = c.request(method.upper(), path, content=body)
                assert 400 <= r.status_code < 500, (name, method, path, r.status_code, r.text[:200])
        assert c.get("/ready").status_code == 200
