"""deploy/rayservice.yaml stays true: its Serve config names promptserve's application builder, and the
builder accepts its args (every one a promptserve setting) and binds the ingress, the engine replicas (with
our task router) and the replica directory."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

pytest.importorskip("ray.serve", reason="the scale-out extra is not installed: pip install 'promptserve[ray]'")

from ray import serve  # noqa: E402

from server.config import Settings  # noqa: E402
from server.scaleout import application  # noqa: E402
from server.scaleout.task_router import TaskAffinityRouter  # noqa: E402

MANIFEST = Path(__file__).resolve().parents[2] / "deploy" / "rayservice.yaml"


def _serve_config() -> dict:
    service = next(d for d in yaml.safe_load_all(MANIFEST.read_text()) if d["kind"] == "RayService")
    return yaml.safe_load(service["spec"]["serveConfigV2"])


def test_the_manifest_names_the_builder_and_its_args_are_settings():
    app = _serve_config()["applications"][0]
    module, name = app["import_path"].split(":")
    assert f"server.scaleout.{module.rsplit('.', 1)[-1]}" == module and getattr(application, name) is application.build
    settings = application.settings_from_args(app["args"])
    assert settings.replicas == 2 and settings.max_replicas == 8 and settings.replica_threads == 4


def test_the_builder_binds_every_deployment(tmp_path):
    app = _serve_config()["applications"][0]
    args = {**app["args"], "model": str(tmp_path / "model"), "store": str(tmp_path / "store"), "api_keys": None}
    built = application.build(args)
    assert isinstance(built, serve.Application)
    options = application.engine_options(Settings(**args))
    assert options["request_router_config"].request_router_class is TaskAffinityRouter \
        or options["request_router_config"].request_router_class.endswith("TaskAffinityRouter")
    assert options["autoscaling_config"] == {"min_replicas": 2, "max_replicas": 8, "target_ongoing_requests": 16}
    assert options["ray_actor_options"]["num_cpus"] == 4


def test_the_builders_args_are_checked_and_one_replica_is_the_least():
    assert application.settings_from_args({}).replicas == 1
    assert application.engine_options(application.settings_from_args({}))["num_replicas"] == 1
    with pytest.raises(ValueError, match="max_batch"):
        application.settings_from_args({"max_batch": 8})  # a typo is not ignored
    assert application.replica_settings(Settings(replicas=3))["shared_store"] is True
