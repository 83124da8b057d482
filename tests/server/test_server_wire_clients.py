"""The unmodified TGI (`text-generation`) and LoRAX (`lorax-client`) Python clients against a live server.

Each client lives in its own virtual environment (see client_venvs.py) and runs a small script in a
subprocess. A failed install fails the test: it is never skipped. (This file is named to run late, so the
install started at the beginning of the session overlaps the other tests.)
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

TGI_SCRIPT = r"""
import json, sys
from text_generation import Client
from text_generation.errors import NotFoundError, ValidationError
url, task = sys.argv[1], sys.argv[2]
client = Client(f"{url}/tasks/{task}", timeout=60)
r = client.generate("Hello world", max_new_tokens=6)
events = list(client.generate_stream("Hello world", max_new_tokens=6))
errors = []
try:
    client.generate("Hello", max_new_tokens=100000)
except ValidationError:
    errors.append("validation")
try:
    Client(f"{url}/tasks/no-such-task", timeout=60).generate("Hello")
except NotFoundError:
    errors.append("not_found")
print(json.dumps({"text": r.generated_text, "ids": [t.id for t in r.details.tokens],
                  "finish": r.details.finish_reason.value, "stream_text": "".join(e.token.text for e in events),
                  "stream_final": events[-1].generated_text, "stream_n": events[-1].details.generated_tokens,
                  "errors": errors}))
"""

LORAX_SCRIPT = r"""
import json, sys
from lorax import Client
from lorax.errors import ValidationError
url, task = sys.argv[1], sys.argv[2]
client = Client(url, timeout=60)
r = client.generate("Hello world", adapter_id=task, max_new_tokens=6, details=True)
events = list(client.generate_stream("Hello world", adapter_id=task, max_new_tokens=6))
errors = []
try:
    client.generate("Hello", adapter_id=task, max_new_tokens=100000)
except ValidationError:
    errors.append("validation")
print(json.dumps({"text": r.generated_text, "ids": [t.id for t in r.details.tokens],
                  "finish": r.details.finish_reason.value, "stream_text": "".join(e.token.text for e in events),
                  "stream_final": events[-1].generated_text, "stream_n": events[-1].details.generated_tokens,
                  "prompt_tokens": r.details.prompt_tokens, "errors": errors}))
"""


def run_client(python: Path, script: str, *args: str) -> dict:
    done = subprocess.run([str(python), "-c", script, *args], capture_output=True, text=True, timeout=120,
                          env={"PATH": os.environ.get("PATH", ""), "HOME": str(Path.home())})
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def reference(server, task_id: str) -> dict:
    with server.client() as c:
        return c.post("/generate", json={"task_id": task_id, "inputs": "Hello world",
                                         "parameters": {"max_new_tokens": 6, "details": True}}).json()


@pytest.mark.parametrize("name,script", [("text-generation", TGI_SCRIPT), ("lorax-client", LORAX_SCRIPT)])
def test_real_client(server, client_venvs, name, script):
    out = run_client(client_venvs.python(name), script, server.url, "task-5")
    ref = reference(server, "task-5")
    assert out["text"] == ref["generated_text"] == out["stream_final"] == out["stream_text"]
    assert out["ids"] == [t["id"] for t in ref["details"]["tokens"]]
    assert out["finish"] == ref["details"]["finish_reason"]
    assert out["stream_n"] == ref["details"]["generated_tokens"]
    assert "validation" in out["errors"]
    if name == "text-generation":
        assert "not_found" in out["errors"]
    else:
        assert out["prompt_tokens"] == ref["details"]["prompt_tokens"]

