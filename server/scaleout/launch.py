"""`promptserve serve --replicas N`: a local or existing Ray cluster, N engine replicas (autoscaled
between --replicas and --max-replicas when the latter is set) behind one ingress on --host/--port of the
Ray head node.
The replicas share the store folder (checked on use), so it must be the same path on every node."""

from __future__ import annotations

import logging
import signal
import threading

from server.config import Settings

log = logging.getLogger(__name__)


def run(settings: Settings) -> int:
    """Deploy, serve until SIGTERM or SIGINT, then shut the application down (replicas drain)."""
    import ray
    from ray import serve

    from server.scaleout.application import build_from_settings

    ray.init(address=settings.ray_address, include_dashboard=False, log_to_driver=True)
    # One endpoint: Ray's HTTP proxy on the head node only (with a proxy on every node, nodes that share a
    # host would contend for the port).
    serve.start(proxy_location="HeadOnly", http_options={"host": settings.host, "port": settings.port})
    serve.run(build_from_settings(settings), name="promptserve", route_prefix="/")
    log.info("serving on http://%s:%d with %d replica(s)", settings.host, settings.port, settings.replicas)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    log.info("shutting down: replicas drain")
    serve.shutdown()
    ray.shutdown()
    return 0
