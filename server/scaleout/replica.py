"""EngineReplica: one Ray Serve replica = one promptserve app (model loaded once, its own engine) on one
device, answering requests the ingress forwards, with every route, auth rule and error as in a single
process. The task id is Ray's multiplexed model id: Ray routes a task's requests to replicas that hold it."""

from __future__ import annotations

from ray import serve

from server.auth import AuthError
from server.scaleout.asgi_bridge import RequestRecord, ResponseStart, forward
from server.scaleout.task_router import TARGET_PREFIX

REPLICA_HEADER = b"x-promptserve-replica"


class EngineReplica:
    """Deployed by application.py with `serve.deployment(...)`; `handle` streams one forwarded request."""

    async def __init__(self, settings_values: dict, torch_threads: int, directory):
        import torch

        from server.app import create_app
        from server.config import Settings

        torch.set_num_threads(torch_threads)
        self.app = create_app(Settings(**settings_values))
        self._lifespan = self.app.router.lifespan_context(self.app)
        await self._lifespan.__aenter__()  # loads the model and warms the engine up, in the background
        await self._until_loaded()
        self.replica_id = serve.get_replica_context().replica_id.unique_id
        self.metrics = self.app.state.metrics
        self._num_holds = 0  # tasks Ray has had this replica take up (each an affinity miss)
        self._directory = directory  # DeploymentHandle of ReplicaDirectory
        await self._directory.report.remote(self.replica_id)

    async def _until_loaded(self) -> None:
        import asyncio

        state = self.app.state
        while state.runtime is None and state.load_error is None:
            await asyncio.sleep(0.1)
        if state.load_error is not None:
            raise RuntimeError(f"the replica could not load the model: {state.load_error}")

    async def check_health(self) -> None:
        """Ray restarts a replica whose engine thread has died. A healthy one reports itself alive."""
        runtime = self.app.state.runtime
        if runtime is None or not runtime.engine.is_alive():
            raise RuntimeError("the engine is not running")
        await self._directory.report.remote(self.replica_id)

    @serve.multiplexed(max_num_models_per_replica=1024)
    async def _hold(self, task_id: str) -> str:
        """Called by Ray only when this replica does not hold the task yet: an affinity miss."""
        self._num_holds += 1
        return task_id

    async def handle(self, record: RequestRecord):
        """Forward one request through this replica's app; yields its parts (asgi_bridge.forward)."""
        task_id = serve.get_multiplexed_model_id()
        if task_id and not task_id.startswith(TARGET_PREFIX):
            num_holds = self._num_holds
            await self._hold(task_id)
            self.metrics.observe_affinity(is_hit=self._num_holds == num_holds)
        is_operator = self._is_operator(record)
        async for part in forward(self.app, record):
            if isinstance(part, ResponseStart) and is_operator:
                part.headers.append((REPLICA_HEADER, self.replica_id.encode()))
            yield part

    def _is_operator(self, record: RequestRecord) -> bool:
        """Whether the caller may learn which replica answered (an operator key, or no keys set): replica
        ids are the deployment's layout, not a tenant's business."""
        keyring = self.app.state.keyring
        if keyring is None:
            return True
        authorization = next((v.decode("latin-1") for k, v in record.headers if k.lower() == b"authorization"), None)
        try:
            return keyring.authenticate(authorization).is_operator
        except AuthError:
            return False

    async def __del__(self):
        """Ray stops the replica: drain like a single server on SIGTERM (running requests finish)."""
        self.app.state.is_draining = True
        await self._directory.withdraw.remote(self.replica_id)
        await self._lifespan.__aexit__(None, None, None)
