"""create_app(settings): the FastAPI app; its lifespan loads the model, store and engine onto app.state."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
from collections.abc import Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI

from server.api import files, fine_tuning, generate, openai, ops, tasks, usage
from server.auth import KeyRing
from server.auth_first import AuthFirstMiddleware
from server.config import Settings
from server.errors import install_error_handlers
from server.exposure import warn_if_open
from server.metrics import Metrics
from server.middleware import AccessLogMiddleware, BodyLimitMiddleware, body_limits
from server.runtime import Runtime, build_runtime
from server.tenancy.gate import tenant_gate
from server.training.service import start_training

log = logging.getLogger("promptserve")


def create_app(settings: Settings | None = None, *,
               runtime_factory: Callable[[Settings], Runtime] = build_runtime) -> FastAPI:
    """A new app; nothing heavy happens until its lifespan starts (uvicorn startup)."""
    settings = settings or Settings()
    app = FastAPI(title="promptserve", version=_version(), lifespan=_lifespan,
                  summary="One frozen language model, many PEFT prompt-tuning adapters, batched together.")
    app.state.settings = settings
    app.state.runtime = None  # set by the lifespan once the model is loaded
    app.state.runtime_factory = runtime_factory
    app.state.is_draining = False  # set on SIGTERM: new requests get 503 while running ones finish
    app.state.load_error = None  # why the model could not be loaded, if it could not
    app.state.on_fatal = lambda: None  # the CLI sets this to stop uvicorn when loading fails
    app.state.training = None  # server/training/service.py's Training once the model is loaded
    # The keys file is read now so that a bad file stops the server before the model loads.
    app.state.keyring = KeyRing.from_file(settings.api_keys) if settings.api_keys else None
    app.state.metrics = Metrics(max_task_labels=settings.metrics_max_tasks,
                                engine_stats=lambda: _runtime_part(app, "engine"),
                                store_stats=lambda: _runtime_part(app, "store"),
                                max_tenant_labels=settings.metrics_max_tenants)
    app.state.tenant_gate = tenant_gate(settings, app.state.metrics.tenants)
    install_error_handlers(app)
    for router in (ops.router, generate.router, openai.router, tasks.router, files.router, fine_tuning.router,
                   usage.router):
        app.include_router(router)
    app.add_middleware(BodyLimitMiddleware, limit_for=body_limits(settings))
    app.add_middleware(AuthFirstMiddleware, keyring_of=lambda: app.state.keyring)  # before any body is read
    app.add_middleware(AccessLogMiddleware, on_finish=app.state.metrics.observe_http)  # outermost
    return app


@asynccontextmanager
async def _lifespan(app: FastAPI):
    warn_if_open(app.state.settings.host, has_keys=app.state.keyring is not None)
    # The model loads in the background so /health answers at once and /ready says when it is done.
    loading = asyncio.create_task(_load(app))
    try:
        yield
    finally:
        loading.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await loading
        runtime, app.state.runtime = app.state.runtime, None  # new requests get 503 while others drain
        if runtime is not None:
            await _stop_engine(runtime.engine, app.state.settings.shutdown_grace_s)
        if app.state.training is not None:  # after the engine: no training slice runs any more
            await asyncio.to_thread(app.state.training.close)
        app.state.tenant_gate.close()  # after the engine: the last requests are metered
        log.info("stopped")


async def _load(app: FastAPI) -> None:
    settings: Settings = app.state.settings
    try:
        runtime = await asyncio.to_thread(app.state.runtime_factory, settings)
        seconds = await asyncio.to_thread(runtime.engine.warm_up)
        log.info("engine warm-up took %.1f s", seconds)
        app.state.training = await asyncio.to_thread(start_training, runtime)
        await asyncio.to_thread(app.state.tenant_gate.read_usage)  # before /ready: later reads are only new lines
        runtime.engine.start()
    except Exception as e:  # noqa: BLE001 - reported on /ready and in the log, then the server stops
        log.exception("loading the model failed")
        app.state.load_error = f"{type(e).__name__}: {e}"
        app.state.on_fatal()
        return
    app.state.runtime = runtime
    log.info("ready: model %s, store %s", runtime.model_name, settings.store)


async def _stop_engine(engine, grace_s: float) -> None:
    if inspect.iscoroutinefunction(engine.stop):
        await engine.stop(grace_s=grace_s)
    else:  # a blocking stop must not block the loop that delivers the last tokens
        await asyncio.to_thread(engine.stop, grace_s=grace_s)


def _runtime_part(app: FastAPI, name: str):
    runtime = app.state.runtime
    return None if runtime is None else getattr(runtime, name).stats()


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("promptserve")
    except PackageNotFoundError:
        return "0"
