"""The target guard: loopback only, no leaving the URL given; and the harness imports no server code."""

from __future__ import annotations

import ast
import asyncio
import subprocess
import sys
from pathlib import Path

import pytest

import loadtest
from loadtest.safety import TargetError, check_target, make_client


@pytest.mark.parametrize("url, base", [
    ("http://127.0.0.1:8000", "http://127.0.0.1:8000"),
    ("http://127.0.0.5:81/", "http://127.0.0.5:81"),
    ("http://[::1]:8000/prefix/", "http://[::1]:8000/prefix"),
    ("https://127.0.0.1", "https://127.0.0.1:443"),
    ("http://localhost:9000", "http://localhost:9000"),
])
def test_loopback_targets_accepted(url, base):
    assert check_target(url).base_url == base


@pytest.mark.parametrize("url", [
    "http://10.0.0.1:8000", "http://192.168.1.2", "http://8.8.8.8", "http://example.com",
    "http://0.0.0.0:8000", "ftp://127.0.0.1", "127.0.0.1:8000", "http://user:pw@127.0.0.1:8000",
    "http://127.0.0.1:8000/?x=1", "http://[2001:db8::1]:80", "file:///etc/passwd",
])
def test_other_targets_refused(url):
    with pytest.raises(TargetError):
        check_target(url)


def test_client_refuses_urls_off_the_target():
    async def go():
        target = check_target("http://127.0.0.1:1")
        async with make_client(target, max_connections=1, timeout_s=1, api_key="k") as client:
            for url in ("http://127.0.0.1:2/generate", "http://127.0.0.2:1/generate", "https://127.0.0.1:1/x",
                        "http://example.com/"):
                with pytest.raises(TargetError):
                    await client.get(url)
            assert client.follow_redirects is False
            assert client.headers["authorization"] == "Bearer k"

    asyncio.run(go())


def loadtest_imports() -> set[str]:
    names = set()
    for path in Path(loadtest.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names.update(a.name.split(".")[0] for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names.add(node.module.split(".")[0])
    return names


def test_harness_is_a_pure_http_client():
    names = loadtest_imports()
    assert "httpx" in names and "loadtest" in names  # the scan sees imports at all
    assert not names & {"server", "prompt_store", "torch", "transformers", "peft", "fastapi", "uvicorn"}
    code = ("import sys, loadtest.cli, loadtest.session, loadtest.plot, loadtest.table; "
            "bad = [m for m in sys.modules if m.split('.')[0] in ('server', 'prompt_store', 'torch')]; "
            "print(bad); sys.exit(1 if bad else 0)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
