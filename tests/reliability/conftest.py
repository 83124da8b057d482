"""Real uvicorn servers on loopback for the reliability tests (helpers shared with tests/server)."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
from live_server_util import LiveServer, run_server
from server.config import Settings

from reliability_util import TASKS, TENANT_TASKS, EngineGate, create_tasks, keys_file


@pytest.fixture(scope="session")
def rel_settings(tiny_model_dir, tmp_path_factory) -> Callable[..., Settings]:
    """Settings for a tiny llama with a fresh store; keyword overrides win."""
    model = tiny_model_dir("llama")

    def make(**overrides) -> Settings:
        values = {"model": str(model), "store": tmp_path_factory.mktemp("rel-store"), "served_model_name": "tiny",
                  "device": "cpu", "max_batch_size": 8, "max_queue": 256, "max_new_tokens": 256,
                  "max_input_tokens": 64, "shutdown_grace_s": 2}
        values.update(overrides)
        return Settings(**values)
    return make


@pytest.fixture(scope="session")
def rel_server(rel_settings) -> Iterator[LiveServer]:
    """No auth, four tasks, batch 8, queue 256."""
    with run_server(rel_settings()) as live:
        create_tasks(live, TASKS)
        yield live


@pytest.fixture(scope="session")
def rel_auth_server(rel_settings, tmp_path_factory) -> Iterator[LiveServer]:
    """API keys of three tenants (an all-tasks admin, acme admin, globex user) and one task each."""
    with run_server(rel_settings(api_keys=keys_file(tmp_path_factory))) as live:
        create_tasks(live, TENANT_TASKS, headers={"Authorization": "Bearer rel-admin-key-1"})
        yield live


@pytest.fixture()
def gate(rel_server) -> Iterator[EngineGate]:
    """An EngineGate installed on the plain server's engine (removed and opened afterwards)."""
    g = EngineGate(rel_server.runtime.engine)
    rel_server.runtime.engine.logits_tap = g.tap
    yield g
    g.opened.set()
    rel_server.runtime.engine.logits_tap = None


