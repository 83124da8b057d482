"""Pydantic wire types of the HTTP API (TGI/LoRAX generate, OpenAI, task admin); no logic beyond checks."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

MAX_STOP_SEQUENCES = 16
# Below these the sampler's logits/temperature (or /penalty) overflow float32 to inf and the request fails
# in the model step (found by schemathesis: temperature 5e-324 gave a 500); refuse them up front instead.
MIN_TEMPERATURE = MIN_TOP_P = 1e-3
MIN_REPETITION_PENALTY, MAX_REPETITION_PENALTY = 1e-3, 1e3
# Type bounds only (the server's own limits, --max-new-tokens and --max-virtual-tokens, are checked next, before
# anything is reserved or allocated): a 400-digit integer is refused by the schema, never reaches float math.
MAX_NEW_TOKENS_FIELD = 2**31 - 1
MAX_VIRTUAL_TOKENS_FIELD = 1 << 16
MAX_INIT_TEXT_CHARS = 10_000


class _Lenient(BaseModel):
    # Clients send fields of newer server versions; like TGI, unknown fields are ignored.
    model_config = ConfigDict(extra="ignore")


class GenerateParameters(_Lenient):
    """TGI / LoRAX `parameters`; features this server lacks are accepted only at their 'off' value."""

    adapter_id: str | None = None
    adapter_source: str | None = None  # LoRAX: where to fetch the adapter; here tasks live in the store
    api_token: str | None = Field(None, repr=False)
    do_sample: bool = False
    max_new_tokens: int | None = Field(None, ge=1, le=MAX_NEW_TOKENS_FIELD)
    ignore_eos_token: bool = False
    repetition_penalty: float | None = Field(None, ge=MIN_REPETITION_PENALTY, le=MAX_REPETITION_PENALTY)
    frequency_penalty: float | None = None
    return_full_text: bool = False
    stop: list[str] = Field(default_factory=list, max_length=MAX_STOP_SEQUENCES)
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    temperature: float | None = Field(None, ge=MIN_TEMPERATURE)
    top_k: int | None = Field(None, gt=0)
    top_p: float | None = Field(None, ge=MIN_TOP_P, le=1)
    truncate: int | None = None
    typical_p: float | None = None
    best_of: int | None = Field(None, ge=1, le=1)
    watermark: bool = False
    details: bool = False
    decoder_input_details: bool = False
    top_n_tokens: int | None = None
    return_k_alternatives: int | None = None
    grammar: Any = None
    response_format: Any = None
    merged_adapters: Any = None

    @model_validator(mode="after")
    def _unsupported_off(self) -> "GenerateParameters":
        unsupported = {
            "frequency_penalty": self.frequency_penalty not in (None, 0.0),
            "truncate": self.truncate is not None,
            "typical_p": self.typical_p not in (None, 1.0),
            "watermark": self.watermark,
            "decoder_input_details": self.decoder_input_details,
            "top_n_tokens": bool(self.top_n_tokens),
            "return_k_alternatives": bool(self.return_k_alternatives),
            "grammar": self.grammar is not None,
            "response_format": self.response_format is not None,
            "merged_adapters": self.merged_adapters is not None,
        }
        bad = [name for name, is_set in unsupported.items() if is_set]
        if bad:
            raise ValueError(f"not supported by this server: {', '.join(bad)}")
        if any(not s for s in self.stop):
            raise ValueError("stop sequences must not be empty")
        return self


class GenerateRequest(_Lenient):
    """Body of POST /generate, /generate_stream and /."""

    inputs: str = Field(min_length=1)
    parameters: GenerateParameters = Field(default_factory=GenerateParameters)
    task_id: str | None = None
    stream: bool = False

    @model_validator(mode="after")
    def _one_task(self) -> "GenerateRequest":
        adapter = self.parameters.adapter_id
        if self.task_id and adapter and adapter != self.task_id:
            raise ValueError("task_id and parameters.adapter_id name different tasks")
        return self

    def resolved_task_id(self) -> str | None:
        """The task to run: `task_id`, else LoRAX's `parameters.adapter_id`, else None (bare model)."""
        return self.task_id or self.parameters.adapter_id or None


class TokenOut(BaseModel):
    """One generated token (TGI `Token`)."""

    id: int
    text: str
    logprob: float
    special: bool


class GenerateDetails(BaseModel):
    """TGI `Details` plus this server's counts."""

    finish_reason: str
    generated_tokens: int
    prompt_tokens: int
    virtual_tokens: int
    seed: int | None
    task_id: str | None
    task_version: str | None
    prefill: list[dict] = Field(default_factory=list)
    tokens: list[TokenOut] = Field(default_factory=list)
    best_of_sequences: None = None


class GenerateResponse(BaseModel):
    """Body returned by POST /generate (POST / returns a one-element list of it)."""

    generated_text: str
    details: GenerateDetails


class StreamDetails(BaseModel):
    """Details sent with the last stream event."""

    finish_reason: str
    generated_tokens: int
    prompt_tokens: int
    input_length: int
    virtual_tokens: int
    seed: int | None


class StreamEvent(BaseModel):
    """One server-sent event of /generate_stream (TGI `StreamResponse`)."""

    index: int
    token: TokenOut
    top_tokens: None = None
    generated_text: str | None = None
    details: StreamDetails | None = None


# ---- OpenAI ---------------------------------------------------------------------------------------

class _OpenAIBase(_Lenient):
    model: str
    max_tokens: int | None = Field(None, ge=1, le=MAX_NEW_TOKENS_FIELD)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, ge=MIN_TOP_P, le=1)
    n: int = Field(1, ge=1, le=1)
    stream: bool = False
    stream_options: dict | None = None
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    frequency_penalty: float | None = Field(None, ge=0, le=0)
    presence_penalty: float | None = Field(None, ge=0, le=0)
    user: str | None = None

    @model_validator(mode="after")
    def _temperature_zero_or_usable(self) -> "_OpenAIBase":
        if self.temperature is not None and 0 < self.temperature < MIN_TEMPERATURE:
            raise ValueError(f"temperature must be 0 (greedy) or at least {MIN_TEMPERATURE}")
        return self

    def stop_list(self) -> list[str]:
        """`stop` as a list (OpenAI accepts a string or a list)."""
        if self.stop is None:
            return []
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop)
        if len(stops) > MAX_STOP_SEQUENCES or any(not s for s in stops):
            raise ValueError("stop: at most 16 non-empty sequences")
        return stops


class CompletionRequest(_OpenAIBase):
    """Body of POST /v1/completions (one prompt, n=1)."""

    prompt: str | list[str]
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=0)

    def prompt_text(self) -> str:
        """The single prompt (a one-element list is accepted too)."""
        if isinstance(self.prompt, list):
            if len(self.prompt) != 1:
                raise ValueError("prompt: exactly one prompt per request")
            return self.prompt[0]
        return self.prompt


class ChatMessage(_Lenient):
    """One chat message."""

    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[dict] | None = None

    def text(self) -> str:
        """The message's text (a list of text parts is joined)."""
        if isinstance(self.content, list):
            return "".join(p.get("text", "") for p in self.content if p.get("type") == "text")
        return self.content or ""


class ChatRequest(_OpenAIBase):
    """Body of POST /v1/chat/completions."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1, le=MAX_NEW_TOKENS_FIELD)
    logprobs: Literal[False] | None = None  # not supported: refused rather than ignored

    def new_tokens(self) -> int | None:
        """`max_completion_tokens`, else the older `max_tokens`."""
        return self.max_completion_tokens or self.max_tokens


# ---- task admin -----------------------------------------------------------------------------------

class TaskInit(BaseModel):
    """JSON body of PUT /v1/tasks/{id}: create a task by one of PEFT's init modes."""

    model_config = ConfigDict(extra="forbid")
    init: Literal["text", "random", "sample_vocab"]
    num_virtual_tokens: int = Field(ge=1, le=MAX_VIRTUAL_TOKENS_FIELD)
    text: str | None = Field(None, max_length=MAX_INIT_TEXT_CHARS)
    seed: int | None = Field(None, ge=0, le=2**63 - 1)

    @model_validator(mode="after")
    def _text_iff_text_init(self) -> "TaskInit":
        if (self.init == "text") != bool(self.text):
            raise ValueError("'text' is required for init 'text' and only for it")
        return self


class TaskOut(BaseModel):
    """One task as the admin API shows it."""

    id: str
    version: str
    num_virtual_tokens: int
    task_type: str
    num_bytes: int
    created: float | None = None
    modified: float | None = None
    error: str | None = None  # set when the folder on disk is not a servable adapter


class TaskList(BaseModel):
    """GET /v1/tasks."""

    tasks: list[TaskOut]
    total: int
