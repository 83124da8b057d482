"""What a server exposes by default (issue 23): the warning of an open admin API on a public address, load
errors on /ready without the machine's paths, and the deployment files' defaults."""

from __future__ import annotations

import logging
from pathlib import Path

import httpx
import pytest
import yaml
from live_server_util import run_server

from reliability_util import keys_file, wait_for

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(("host", "has_keys", "warns"), [("0.0.0.0", False, True), ("::", False, True),
                                                         ("10.1.2.3", False, True), ("0.0.0.0", True, False),
                                                         ("127.0.0.1", False, False), ("localhost", False, False)])
def test_a_public_address_without_keys_logs_a_loud_warning(rel_settings, tmp_path_factory, caplog, host, has_keys,
                                                           warns):
    keys = {"api_keys": keys_file(tmp_path_factory)} if has_keys else {}
    # The socket is loopback either way (run_server binds it): `host` is what the server was told to listen on.
    with caplog.at_level(logging.WARNING, logger="promptserve"), \
            run_server(rel_settings(host=host, **keys), wait_path="/health"):
        pass
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING and "SECURITY" in r.getMessage()]
    assert bool(warnings) == warns, warnings
    if warns:
        assert host in warnings[0] and "--api-keys" in warnings[0]


def test_ready_names_no_paths_when_the_model_cannot_load(rel_settings, tmp_path):
    secret = tmp_path / "secret-folder-name" / "model"
    with run_server(rel_settings(model=str(secret)), wait_path="/health") as live:
        wait_for(lambda: live.app.state.load_error is not None, what="the load error")
        r = httpx.get(live.url + "/ready", timeout=10)
    assert r.status_code == 503 and "loading the model failed" in r.json()["error"]
    assert "secret-folder-name" not in r.text and str(tmp_path) not in r.text, r.text


def test_the_kuberay_manifest_exposes_neither_the_ray_client_nor_the_dashboard():
    """Ray's job API runs code for anyone who reaches it. The client port is not in the head's ports (so not in
    KubeRay's head service); the dashboard is there only because the operator deploys through it, and the
    NetworkPolicy admits to it only the operator; 8000 is the one port open to all."""
    docs = [d for d in yaml.safe_load_all((ROOT / "deploy" / "rayservice.yaml").read_text()) if d]
    service = next(d for d in docs if d["kind"] == "RayService")
    head = service["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]
    ports = {p["containerPort"] for c in head["spec"]["containers"] for p in c.get("ports", [])}
    assert 10001 not in ports and 8000 in ports, ports
    policy = next(d for d in docs if d["kind"] == "NetworkPolicy")
    assert policy["spec"]["podSelector"]["matchLabels"] == head["metadata"]["labels"]
    for rule in policy["spec"]["ingress"]:
        rule_ports = {p["port"] for p in rule.get("ports", [])}
        if "from" not in rule:  # open to all: the HTTP endpoint only
            assert rule_ports == {8000}, rule
        elif 8265 in rule_ports:
            assert all(src.get("podSelector", {}).get("matchLabels") == {"app.kubernetes.io/name": "kuberay-operator"}
                       for src in rule["from"]), rule


def test_the_docker_image_documents_running_with_keys():
    header = [line for line in (ROOT / "Dockerfile").read_text().splitlines() if line.startswith("#")]
    text = "\n".join(header)
    assert "--api-keys" in text or "PROMPTSERVE_API_KEYS" in text, text
