"""The OpenAPI schema documents the statuses each route really answers (built by create_app; no model loads)."""

from __future__ import annotations

import pytest
from fastapi.exceptions import RequestValidationError

from prompt_store.errors import InvalidTaskId, TaskNotFound
from server.api.responses import RATE_LIMIT_HEADERS, ErrorOut, error_responses
from server.api_error import ApiError
from server.app import create_app
from server.auth import AuthError, ForbiddenError
from server.config import Settings
from server.engine.errors import QueueFull
from server.errors import describe

GENERATION = [("post", p) for p in ("/generate", "/generate_stream", "/", "/tasks/{task_id}/generate",
                                    "/tasks/{task_id}/generate_stream", "/tasks/{task_id}", "/v1/completions",
                                    "/v1/chat/completions")]
NO_AUTH = {("get", "/health"), ("get", "/ready")}
# Every route that checks the key's scope (task patterns, admin) after it is known.
SCOPE_CHECKED = [*GENERATION, ("get", "/metrics"), ("get", "/v1/models/{model_id}"), ("get", "/v1/tasks/{task_id}"),
                 ("put", "/v1/tasks/{task_id}"), ("delete", "/v1/tasks/{task_id}"), ("post", "/v1/fine_tuning/jobs")]
MODEL_TAGS = {"generate", "openai", "tasks", "fine-tuning"}  # routers whose routes need the loaded model
ERROR_BODY_REF = "#/components/schemas/ErrorOut"


@pytest.fixture(scope="module")
def schema(tmp_path_factory) -> dict:
    settings = Settings(model="unused", store=tmp_path_factory.mktemp("store"), device="cpu")
    return create_app(settings).openapi()


def operations(schema: dict):
    """(method, path, operation) of every route."""
    for path, methods in schema["paths"].items():
        for method, op in methods.items():
            yield method, path, op


def statuses(schema: dict, method: str, path: str) -> dict:
    return schema["paths"][path][method]["responses"]


@pytest.mark.parametrize(("method", "path"), GENERATION)
def test_generation_routes_document_429_with_rate_limit_headers(schema, method, path):
    responses = statuses(schema, method, path)
    headers = responses["429"]["headers"]
    assert set(headers) == {"Retry-After", *RATE_LIMIT_HEADERS}
    for kind in ("requests", "tokens"):
        assert headers[f"x-ratelimit-limit-{kind}"]["schema"]["type"] == "integer"
        assert headers[f"x-ratelimit-remaining-{kind}"]["schema"]["type"] == "integer"
        assert headers[f"x-ratelimit-reset-{kind}"]["schema"]["type"] == "string"  # "1s", "6m0s"
    assert set(RATE_LIMIT_HEADERS) <= set(responses["200"]["headers"])  # sent on success too


def test_only_generation_routes_document_rate_limit_headers(schema):
    limited = {(m, p) for m, p, op in operations(schema)
               if "x-ratelimit-limit-requests" in op["responses"].get("429", {}).get("headers", {})}
    assert limited == set(GENERATION)


def test_every_route_with_auth_documents_401(schema):
    for method, path, op in operations(schema):
        if (method, path) in NO_AUTH:
            assert "401" not in op["responses"], (method, path)
        else:
            assert "WWW-Authenticate" in op["responses"]["401"]["headers"], (method, path)


@pytest.mark.parametrize(("method", "path"), SCOPE_CHECKED)
def test_scope_checked_routes_document_403(schema, method, path):
    assert "403" in statuses(schema, method, path)


def test_routes_that_need_the_model_document_503(schema):
    for method, path, op in operations(schema):
        if MODEL_TAGS & set(op.get("tags", ())) or path in ("/ready", "/info"):
            assert "503" in op["responses"], (method, path)


def test_routes_with_a_body_document_400_413_422(schema):
    for method, path, op in operations(schema):
        if "requestBody" in op:
            assert {"400", "413", "422"} <= set(op["responses"]), (method, path)


def test_routes_naming_a_task_document_400_and_404(schema):
    for method, path, op in operations(schema):
        if "{task_id}" in path or "{model_id}" in path:
            expected = {"400"} if method == "put" else {"400", "404"}  # PUT creates a missing task
            assert expected <= set(op["responses"]), (method, path)


def test_every_error_response_is_the_error_body_and_never_500(schema):
    for method, path, op in operations(schema):
        for status, response in op["responses"].items():
            assert not status.startswith("5") or status == "503", (method, path, status)
            if int(status) >= 400:
                ref = response["content"]["application/json"]["schema"]["$ref"]
                assert ref == ERROR_BODY_REF, (method, path, status)
    assert "HTTPValidationError" not in schema["components"]["schemas"]  # FastAPI's 422 shape is never sent


@pytest.mark.parametrize("exc", [
    RequestValidationError([{"loc": ("body", "inputs"), "msg": "Field required", "type": "missing"}]),
    TaskNotFound("task 'x': not found"), InvalidTaskId("bad id"), QueueFull("full"), AuthError("no key"),
    ForbiddenError("not yours"), ApiError(415, "unsupported_media_type", "send JSON"),
])
def test_error_body_model_matches_what_the_server_sends(exc):
    body = describe(exc).json()
    assert set(body) == set(ErrorOut.model_fields)
    ErrorOut.model_validate(body, strict=True)


def test_error_responses_refuses_500_and_a_rate_limit_without_429():
    with pytest.raises(ValueError, match="500"):
        error_responses(400, 500)
    with pytest.raises(ValueError, match="429"):
        error_responses(401, rate_limited=True)
    assert set(error_responses(429)[429]["headers"]) == {"Retry-After"}  # the rate-limit headers only when asked
