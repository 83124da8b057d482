"""Ingress: the one HTTP endpoint in front of the replicas. It checks the key and the body's size first
(ingress_guard.py), then forwards the request, untouched, to a replica chosen by the task router
(task_router.py), and streams the replica's answer back. Only a valid task id the key may use steers
routing, so no client can name a replica (`@replica:<id>` is the ingress's own) or fill the router's memory.

A replica that dies before its engine admitted the request (the request was queued there) has done
nothing for it: the request is sent once more, to another replica. A replica that dies while generating
gives 503 with Retry-After, or, once the answer has begun, an `unavailable` error event that ends the
stream. Such a request is not sent again: it may be what killed the replica. Ray starts a new replica.

GET /metrics is asked of every live replica (directory.py), and the answers are merged, labelled by
replica (federation.py). GET /ready is answered by one replica (the endpoint can serve), with the number
of live replicas in a header.
"""

from __future__ import annotations

import asyncio
import json
import logging

from prometheus_client import CONTENT_TYPE_LATEST
from ray.exceptions import RayError
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from server.scaleout.asgi_bridge import EngineStarted, RequestRecord, ResponseStart
from server.scaleout.federation import merge_expositions
from server.auth import AuthError
from server.errors import BodyTooLarge, error_response
from server.scaleout.ingress_guard import IngressGuard, routing_task
from server.scaleout.routing import is_retry_safe
from server.scaleout.task_router import TARGET_PREFIX

log = logging.getLogger(__name__)
RETRY_AFTER_S = 1
MAX_ATTEMPTS = 2
ATTEMPTS_HEADER = b"x-promptserve-attempts"
LIVE_REPLICAS_HEADER = b"x-promptserve-replicas-live"  # on /ready: replicas loaded and healthy
METRICS_TIMEOUT_S = 3.0


class Ingress:
    """Deployed by application.py with `serve.deployment(...)`; Ray's HTTP proxy calls it for every path."""

    def __init__(self, replicas, directory, settings_values: dict | None = None):
        self._replicas = replicas  # DeploymentHandle of EngineReplica
        self._directory = directory  # DeploymentHandle of ReplicaDirectory
        self._guard = IngressGuard.from_settings(settings_values or {})

    async def __call__(self, request: Request) -> Response:
        try:  # the key before the body, the body within its limit: as in one process (server/auth_first.py)
            tenant = self._guard.tenant(request)
            body = await self._guard.body(request)
        except (AuthError, BodyTooLarge) as exc:
            return error_response(exc)
        record = RequestRecord(request.method, request.url.path, request.url.query.encode(),
                               list(request.headers.raw), body,
                               (request.client.host, request.client.port) if request.client else None)
        if request.method == "GET" and record.path == "/metrics":
            return await self._federated_metrics(record)
        task_id = routing_task(tenant, request.method, record.path, body)
        for attempt in range(1, MAX_ATTEMPTS + 1):
            reply = _Reply(self._replicas.options(multiplexed_model_id=task_id, stream=True).handle.remote(record))
            try:
                start = await reply.begin()
                break
            except RayError as exc:
                again = not reply.is_started and attempt < MAX_ATTEMPTS and is_retry_safe(request.method, record.path)
                log.warning("replica failed before answering %s %s (%s): %s", request.method, record.path,
                            "sending it again" if again else "503", exc)
                if not again:
                    return _unavailable()
        if start.is_complete:  # one message back to the proxy, not a stream
            response = Response(start.body, status_code=start.status)
        else:
            response = StreamingResponse(_rest(start.body, reply.parts, record.path), status_code=start.status)
        response.raw_headers = [*_without_request_id(start.headers), (ATTEMPTS_HEADER, str(attempt).encode())]
        if record.path == "/ready":  # one replica ready makes the endpoint ready; this says how many are
            response.raw_headers.append((LIVE_REPLICAS_HEADER, str(len(await self._directory.live.remote())).encode()))
        return response

    async def _federated_metrics(self, record: RequestRecord) -> Response:
        """Every live replica's /metrics, merged and labelled by replica. The key is checked by each
        replica as in one process: a refusal (401/403) is passed on as it came."""
        replica_ids = await self._directory.live.remote()
        # One replica at a time: Ray gives a request's calls its own request id, and its router matches
        # a routing decision to the waiting call by that id, so concurrent calls could swap replicas.
        answers = {r: await self._whole_answer(r, record) for r in replica_ids}
        got = {r: a for r, a in answers.items() if a is not None}
        if not got:
            return _unavailable()
        refused = next(((start, body) for start, body in got.values() if start.status != 200), None)
        if refused is not None:
            response = Response(refused[1], status_code=refused[0].status)
            response.raw_headers = _without_request_id(refused[0].headers)
            return response
        merged = merge_expositions({r: body.decode() for r, (_, body) in got.items()})
        return Response(merged, media_type=CONTENT_TYPE_LATEST)

    async def _whole_answer(self, replica_id: str, record: RequestRecord) -> tuple[ResponseStart, bytes] | None:
        """`record` answered by that one replica, or None if it is gone or too slow."""
        parts = self._replicas.options(multiplexed_model_id=TARGET_PREFIX + replica_id, stream=True).handle.remote(
            record)

        async def collect() -> tuple[ResponseStart, bytes]:
            start, chunks = None, []
            async for part in parts:
                if isinstance(part, ResponseStart):
                    start = part
                    chunks.append(part.body)
                elif isinstance(part, bytes):
                    chunks.append(part)
            return start, b"".join(chunks)

        try:
            return await asyncio.wait_for(collect(), METRICS_TIMEOUT_S)
        except (RayError, asyncio.TimeoutError) as exc:
            log.warning("replica %s did not answer /metrics: %r", replica_id, exc)
            return None


class _Reply:
    """One attempt's parts, read up to the answer's start."""

    def __init__(self, parts):
        self.parts = parts
        self.is_started = False  # the replica's engine admitted the request

    async def begin(self) -> ResponseStart:
        """The response's start (with its first body chunk): from here the answer is the client's."""
        async for part in self.parts:
            if isinstance(part, EngineStarted):
                self.is_started = True
            else:
                return part
        raise RuntimeError("the replica ended the request without a response")


async def _rest(first_chunk: bytes, parts, path: str):
    if first_chunk:
        yield first_chunk
    try:
        async for part in parts:
            if isinstance(part, bytes):
                yield part
    except RayError as exc:  # the replica died mid-answer: the status line is sent, so end the stream
        log.warning("replica failed while answering %s: %s", path, exc)
        yield b"data:" + json.dumps({"error": "the replica serving this request failed; retry",
                                     "error_type": "unavailable"}).encode() + b"\n\n"


def _without_request_id(headers: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    # Ray's proxy adds the request id itself (the replica echoed the one it was given).
    return [(k, v) for k, v in headers if k.lower() != b"x-request-id"]


def _unavailable() -> Response:
    return JSONResponse({"error": "the replica serving this request failed; retry", "error_type": "unavailable"},
                        status_code=503, headers={"Retry-After": str(RETRY_AFTER_S)})
