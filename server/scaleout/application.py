"""The Ray Serve application: the ingress, the engine replicas and the replica directory, bound from
Settings. `promptserve serve --replicas N` runs it (launch.py); a KubeRay RayService names `build` as its
import path, with the settings as `args` (deploy/rayservice.yaml)."""

from __future__ import annotations

import os

from ray import serve
from ray.serve.config import RequestRouterConfig

from server.config import Settings
from server.preloads import preload_vars
from server.scaleout.directory import ReplicaDirectory
from server.scaleout.ingress import Ingress
from server.scaleout.replica import EngineReplica
from server.scaleout.task_router import TaskAffinityRouter

_SCALEOUT_FIELDS = {"replicas", "max_replicas", "target_ongoing_requests", "replica_num_cpus",
                    "replica_num_gpus", "replica_threads", "route_imbalance", "ray_address"}


def build(args: dict) -> serve.Application:
    """Ray Serve's application builder: `args` are Settings fields (e.g. model, store, replicas)."""
    return build_from_settings(settings_from_args(args))


def settings_from_args(args: dict) -> Settings:
    """Settings from a Serve config's args: unknown names are refused (Settings alone ignores them, as it
    must for the environment), and at least one replica runs."""
    unknown = sorted(set(args) - set(Settings.model_fields))
    if unknown:
        raise ValueError(f"unknown promptserve settings in the application's args: {', '.join(unknown)}")
    settings = Settings(**args)
    return settings if settings.replicas else settings.model_copy(update={"replicas": 1})


def build_from_settings(settings: Settings) -> serve.Application:
    """The bound application of `settings` (settings.replicas >= 1)."""
    engine = serve.deployment(EngineReplica).options(**engine_options(settings))
    ingress = serve.deployment(Ingress).options(name="promptserve-ingress", max_ongoing_requests=100_000,
                                                ray_actor_options={"num_cpus": 0})  # it only forwards
    directory = serve.deployment(ReplicaDirectory).options(name="promptserve-directory",
                                                           ray_actor_options={"num_cpus": 0}).bind()
    values = replica_settings(settings)  # the ingress checks keys and body limits as the replicas do
    return ingress.bind(engine.bind(values, settings.replica_threads, directory), directory, values)


def replica_settings(settings: Settings) -> dict:
    """What each replica's app is built from: the same settings, the store shared, no scale-out."""
    values = settings.model_dump(exclude=_SCALEOUT_FIELDS)
    values["shared_store"] = True
    return values


def engine_options(settings: Settings) -> dict:
    """Ray Serve options of the engine replicas."""
    router = RequestRouterConfig(request_router_class=TaskAffinityRouter,
                                 request_router_kwargs={"imbalance": settings.route_imbalance})
    actor = {"num_cpus": settings.replica_num_cpus, "num_gpus": settings.replica_num_gpus}
    if env_vars := preload_vars(dict(os.environ)):  # a replica's process starts with them, as `serve` does
        actor["runtime_env"] = {"env_vars": env_vars}
    options = {"name": "promptserve-engine", "request_router_config": router, "ray_actor_options": actor,
               # A replica batches everything it is sent: let Ray send it as many as it can queue.
               "max_ongoing_requests": settings.max_batch_size + settings.max_queue,
               "health_check_period_s": 5}
    if settings.max_replicas:
        options["autoscaling_config"] = {"min_replicas": settings.replicas, "max_replicas": settings.max_replicas,
                                         "target_ongoing_requests": settings.target_ongoing_requests}
    else:
        options["num_replicas"] = settings.replicas
    return options
