"""Ingress: the one HTTP endpoint in front of the replicas. It forwards each request, untouched, to a
replica chosen by Ray: one that holds the request's task when there is one (multiplexed model id), load
spreading otherwise, and streams the replica's answer back. A replica that dies before answering gives
503 with Retry-After; Ray starts a new one."""

from __future__ import annotations

import json
import logging

from ray.exceptions import RayError
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from server.scaleout.asgi_bridge import RequestRecord
from server.scaleout.routing import task_of

log = logging.getLogger(__name__)
RETRY_AFTER_S = 1


class Ingress:
    """Deployed by launch.py with `serve.deployment(...)`; Ray's HTTP proxy calls it for every path."""

    def __init__(self, replicas):
        self._replicas = replicas  # DeploymentHandle of EngineReplica

    async def __call__(self, request: Request) -> Response:
        body = await request.body()
        record = RequestRecord(request.method, request.url.path, request.url.query.encode(),
                               list(request.headers.raw), body,
                               (request.client.host, request.client.port) if request.client else None)
        task_id = task_of(request.method, record.path, body)
        parts = self._replicas.options(multiplexed_model_id=task_id, stream=True).handle.remote(record)
        try:
            start = await parts.__anext__()
        except RayError as exc:
            log.warning("replica failed before answering %s %s: %s", request.method, record.path, exc)
            return _unavailable()
        response = StreamingResponse(_rest(parts, record.path), status_code=start.status)
        # Ray's proxy adds the request id itself (the replica echoed the one it was given).
        response.raw_headers = [(k, v) for k, v in start.headers if k.lower() != b"x-request-id"]
        return response


async def _rest(parts, path: str):
    try:
        async for chunk in parts:
            yield chunk
    except RayError as exc:  # the replica died mid-answer: the status line is sent, so end the stream
        log.warning("replica failed while answering %s: %s", path, exc)
        yield b"data:" + json.dumps({"error": "the replica serving this request failed; retry",
                                     "error_type": "unavailable"}).encode() + b"\n\n"


def _unavailable() -> Response:
    return JSONResponse({"error": "the replica serving this request failed; retry", "error_type": "unavailable"},
                        status_code=503, headers={"Retry-After": str(RETRY_AFTER_S)})
