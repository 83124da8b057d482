"""Real uvicorn servers on free loopback ports, each with a tiny model and a temporary store."""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterator

import pytest
from client_venvs import ClientVenvs
from live_server_util import LiveServer, run_server

from server.config import Settings

NUM_TASKS = 8
KEYS = {
    "admin-key-0001": {"tenant": "ops", "tasks": ["*"], "admin": True},
    "acme-key-0001": {"tenant": "acme", "tasks": ["acme-*"], "base_model": False},
    "acme-admin-0001": {"tenant": "acme-admins", "tasks": ["acme-*"], "admin": True},
    "globex-key-0001": {"tenant": "globex", "tasks": ["globex-*", "shared-?"]},
}


@pytest.fixture(scope="session", autouse=True)
def client_venvs() -> ClientVenvs:
    """The TGI and LoRAX client venvs, installing in the background from the session's start."""
    return ClientVenvs()


@pytest.fixture(scope="session")
def model_dir(tiny_model_dir) -> Path:
    return tiny_model_dir("llama")


@pytest.fixture(scope="session")
def make_settings(model_dir, tmp_path_factory) -> Callable[..., Settings]:
    def make(**overrides) -> Settings:
        values = dict(model=str(model_dir), store=tmp_path_factory.mktemp("store"), served_model_name="tiny",
                      device="cpu", max_batch_size=16, max_new_tokens=64, max_input_tokens=128,
                      shutdown_grace_s=2)
        values.update(overrides)
        return Settings(**values)
    return make


def task_ids() -> list[str]:
    return [f"task-{i}" for i in range(NUM_TASKS)]


@pytest.fixture(scope="session")
def tasks() -> list[str]:
    """The main server's task ids; task-i has 2 + 3*i virtual tokens."""
    return task_ids()


@pytest.fixture(scope="session")
def server(make_settings) -> Iterator[LiveServer]:
    """The main server: no auth, 8 tasks of different lengths (RANDOM init, fixed seeds)."""
    with run_server(make_settings()) as live:
        with live.client() as c:
            for i, task_id in enumerate(task_ids()):
                r = c.put(f"/v1/tasks/{task_id}", json={"init": "random", "num_virtual_tokens": 2 + 3 * i,
                                                         "seed": i})
                assert r.status_code == 201, r.text
        yield live


@pytest.fixture(scope="session")
def keys_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("keys") / "keys.yaml"
    import yaml

    path.write_text(yaml.safe_dump({"keys": [{"key": k, **v} for k, v in KEYS.items()]}))
    return path


@pytest.fixture(scope="session")
def auth_server(make_settings, keys_file) -> Iterator[LiveServer]:
    """A server with API keys and tasks of two tenants."""
    with run_server(make_settings(api_keys=keys_file)) as live:
        with live.client(headers={"Authorization": "Bearer admin-key-0001"}) as c:
            for task_id in ("acme-a", "acme-b", "globex-a", "shared-1", "other"):
                r = c.put(f"/v1/tasks/{task_id}", json={"init": "random", "num_virtual_tokens": 3})
                assert r.status_code == 201, r.text
        yield live


@pytest.fixture(scope="session")
def tight_server(make_settings) -> Iterator[LiveServer]:
    """Small limits: batch 1, queue 1, tiny bodies, short inputs (for 413/422/429)."""
    settings = make_settings(max_batch_size=1, max_queue=1, max_input_tokens=16, max_new_tokens=32,
                             max_body_bytes=4096, max_upload_bytes=64 * 1024)
    with run_server(settings) as live:
        with live.client() as c:
            assert c.put("/v1/tasks/t1", json={"init": "random", "num_virtual_tokens": 4}).status_code == 201
        yield live
