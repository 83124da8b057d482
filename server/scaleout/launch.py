"""`promptserve serve --replicas N`: a local or existing Ray cluster, N engine replicas (autoscaled
between --replicas and --max-replicas when the latter is set) behind one ingress on --host/--port.
The replicas share the store folder (checked on use), so it must be the same path on every node."""

from __future__ import annotations

import logging
import signal
import threading

from server.config import Settings

log = logging.getLogger(__name__)
_SCALEOUT_FIELDS = {"replicas", "max_replicas", "target_ongoing_requests", "replica_num_cpus",
                    "replica_num_gpus", "replica_threads", "ray_address"}


def replica_settings(settings: Settings) -> dict:
    """What each replica's app is built from: the same settings, the store shared, no scale-out."""
    values = settings.model_dump(exclude=_SCALEOUT_FIELDS)
    values["shared_store"] = True
    return values


def deployment_options(settings: Settings) -> dict:
    """Ray Serve options of the engine replicas."""
    options = {"name": "promptserve-engine",
               "ray_actor_options": {"num_cpus": settings.replica_num_cpus, "num_gpus": settings.replica_num_gpus},
               # A replica batches everything it is sent: let Ray send it as many as it can queue.
               "max_ongoing_requests": settings.max_batch_size + settings.max_queue,
               "health_check_period_s": 5}
    if settings.max_replicas:
        options["autoscaling_config"] = {"min_replicas": settings.replicas, "max_replicas": settings.max_replicas,
                                         "target_ongoing_requests": settings.target_ongoing_requests}
    else:
        options["num_replicas"] = settings.replicas
    return options


def run(settings: Settings) -> int:
    """Deploy, serve until SIGTERM or SIGINT, then shut the application down (replicas drain)."""
    import ray
    from ray import serve

    from server.scaleout.ingress import Ingress
    from server.scaleout.replica import EngineReplica

    ray.init(address=settings.ray_address, include_dashboard=False, log_to_driver=True)
    serve.start(http_options={"host": settings.host, "port": settings.port})
    engine = serve.deployment(EngineReplica).options(**deployment_options(settings))
    ingress = serve.deployment(Ingress).options(name="promptserve-ingress", max_ongoing_requests=100_000,
                                                ray_actor_options={"num_cpus": 0})  # it only forwards
    serve.run(ingress.bind(engine.bind(replica_settings(settings), settings.replica_threads)),
              name="promptserve", route_prefix="/")
    log.info("serving on http://%s:%d with %d replica(s)", settings.host, settings.port, settings.replicas)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    log.info("shutting down: replicas drain")
    serve.shutdown()
    ray.shutdown()
    return 0
