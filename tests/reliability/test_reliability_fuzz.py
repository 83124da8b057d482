"""schemathesis against the server's own OpenAPI schema, every operation, with and without keys.

Checks: no 5xx, every status documented for its operation, and every documented response valid against
the schema. Bounded for CI (a few examples per operation);
`PROMPTSERVE_FUZZ_EXAMPLES=50 PROMPTSERVE_FUZZ_PHASES=examples,coverage,fuzzing,stateful` runs the long version.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

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


def fuzz(url: str, *headers: str) -> subprocess.CompletedProcess:
    exe = shutil.which("schemathesis", path=os.path.dirname(sys.executable)) or "schemathesis"
    cmd = [exe, "run", f"{url}/openapi.json", "--checks", CHECKS,
           "--max-examples", EXAMPLES, "--phases", PHASES, "--max-time", MAX_TIME, "--workers", "2",
           "--request-timeout", "60", "--seed", "7", "--suppress-health-check", "all"]
    for h in headers:
        cmd += ["--header", h]
    return subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=600)


def test_fuzz_without_auth(fuzz_servers):
    result = fuzz(fuzz_servers[0].url)
    assert result.returncode == 0, result.stdout[-6000:]
    num = _num_operations(fuzz_servers[0].url)  # every route in the schema was fuzzed
    assert f"Selected: {num}/{num}" in result.stdout, result.stdout[-3000:]


def _num_operations(url: str) -> int:
    import httpx

    paths = httpx.get(f"{url}/openapi.json", timeout=10).json()["paths"]
    return sum(1 for methods in paths.values() for method in methods if method in ("get", "post", "put", "delete"))


@pytest.mark.parametrize("key", ["rel-admin-key-1", "rel-globex-key1", None])
def test_fuzz_with_auth(fuzz_servers, key):
    result = fuzz(fuzz_servers[1].url, *([f"Authorization: Bearer {key}"] if key else []))
    assert result.returncode == 0, result.stdout[-6000:]
