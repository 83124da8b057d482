"""One request against /generate or /generate_stream, timed: a RequestRecord whatever happens."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field

import httpx

from loadtest.safety import TargetError
from loadtest.workload import RequestSpec

STATUS_RATE_LIMITED = "429"  # the server's rate limit: counted apart from errors, never retried
STATUS_TIMEOUT = "timeout"
STATUS_CONNECT = "connect_error"
STATUS_STREAM_ERROR = "stream_error"  # HTTP 200 but the stream carried an error event or broke off
STATUS_CANCELLED = "cancelled"  # the run's hard deadline came first
STATUS_DROPPED = "dropped"  # open loop: too many in flight on the client side, never sent


@dataclass
class RequestRecord:
    """What happened to one request; times in seconds from the run's start."""

    index: int
    task_id: str | None
    start_s: float
    end_s: float = 0.0
    status: str = ""  # "200", "429", ... or one of the STATUS_* names
    error: str = ""
    first_token_s: float | None = None  # time to first token (streaming only)
    inter_token_s: list[float] = field(default_factory=list)  # gaps between streamed tokens
    generated_tokens: int = 0
    prompt_tokens: int | None = None
    finish_reason: str | None = None
    tenant: str | None = None

    @property
    def is_ok(self) -> bool:
        """True for a complete, successful generation."""
        return self.status == "200"

    @property
    def is_rate_limited(self) -> bool:
        """True for HTTP 429: the server's limits at work, not an error."""
        return self.status == STATUS_RATE_LIMITED

    @property
    def is_failed(self) -> bool:
        """True for an error: neither a success nor rate limited."""
        return not self.is_ok and not self.is_rate_limited

    @property
    def latency_s(self) -> float:
        """Send to last byte."""
        return self.end_s - self.start_s


def request_body(spec: RequestSpec, *, ignore_eos: bool) -> dict:
    """The TGI-shaped JSON body for `spec`."""
    parameters = {"max_new_tokens": spec.max_new_tokens, "details": True}
    if ignore_eos:
        parameters["ignore_eos_token"] = True  # LoRAX's name; TGI ignores it
    body = {"inputs": spec.prompt, "parameters": parameters}
    if spec.task_id is not None:
        body["task_id"] = spec.task_id
    return body


def parse_sse_data(line: str) -> dict | None:
    """The JSON of one `data:` line of a server-sent event stream, or None for other lines."""
    if not line.startswith("data:"):
        return None
    payload = line[5:].strip()
    if not payload or payload == "[DONE]":
        return None
    return json.loads(payload)


def apply_details(record: RequestRecord, details: dict | None) -> None:
    """Copy what the server says about the generation into the record."""
    if not details:
        return
    record.generated_tokens = int(details.get("generated_tokens", record.generated_tokens))
    record.prompt_tokens = details.get("prompt_tokens")
    record.finish_reason = details.get("finish_reason")


async def send_plain(client: httpx.AsyncClient, record: RequestRecord, body: dict, headers: dict, clock) -> None:
    """POST /generate and wait for the whole answer."""
    response = await client.post("/generate", json=body, headers=headers)
    record.status = str(response.status_code)
    if response.status_code != 200:
        record.error = response.text[:200]
        return
    apply_details(record, response.json().get("details"))


async def send_stream(client: httpx.AsyncClient, record: RequestRecord, body: dict, headers: dict, clock) -> None:
    """POST /generate_stream and time every token event."""
    async with client.stream("POST", "/generate_stream", json=body, headers=headers) as response:
        record.status = str(response.status_code)
        if response.status_code != 200:
            record.error = (await response.aread()).decode(errors="replace")[:200]
            return
        last = None
        is_finished = False
        async for line in response.aiter_lines():
            event = parse_sse_data(line)
            if event is None:
                continue
            if "error" in event:
                record.status, record.error = STATUS_STREAM_ERROR, str(event["error"])[:200]
                return
            now = clock()
            if event.get("token") is not None:
                if last is None:
                    record.first_token_s = now - record.start_s
                else:
                    record.inter_token_s.append(now - last)
                last = now
                record.generated_tokens += 1
            if event.get("details") is not None or event.get("generated_text") is not None:
                apply_details(record, event.get("details"))
                is_finished = True
        if not is_finished:
            record.status, record.error = STATUS_STREAM_ERROR, "stream ended without a final event"


async def send(client: httpx.AsyncClient, spec: RequestSpec, *, is_stream: bool, ignore_eos: bool, clock,
               api_key: str | None = None) -> RequestRecord:
    """Send one request (with `api_key` over the client's own, if given); every outcome, failures and
    429s included, becomes a RequestRecord. Nothing is retried: a 429 is counted as it came."""
    record = RequestRecord(index=spec.index, task_id=spec.task_id, start_s=clock(), tenant=spec.tenant)
    body = request_body(spec, ignore_eos=ignore_eos)
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        await (send_stream if is_stream else send_plain)(client, record, body, headers, clock)
    except TargetError:
        raise
    except httpx.TimeoutException as exc:
        record.status, record.error = STATUS_TIMEOUT, type(exc).__name__
    except (httpx.ConnectError, httpx.RemoteProtocolError, httpx.ReadError) as exc:
        record.status, record.error = STATUS_CONNECT, f"{type(exc).__name__}: {exc}"[:200]
    except (ValueError, KeyError) as exc:  # malformed JSON from the server
        record.status, record.error = STATUS_STREAM_ERROR, f"bad response: {exc}"[:200]
    record.end_s = clock()
    return record


def monotonic_clock(start: float | None = None):
    """A clock reading seconds since `start` (default: now)."""
    origin = time.perf_counter() if start is None else start
    return lambda: time.perf_counter() - origin
