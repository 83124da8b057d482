"""The OpenAI-compatible API, driven by the real `openai` client."""

from __future__ import annotations

import openai
import pytest
from live_server_util import assert_error, sse_events


@pytest.fixture()
def client(server):
    with openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60) as c:
        yield c


def tgi(server, task_id, inputs, n):
    with server.client() as c:
        body = {"inputs": inputs, "parameters": {"max_new_tokens": n}}
        if task_id:
            body["task_id"] = task_id
        return c.post("/generate", json=body).json()


def test_models_lists_base_model_and_tasks(client, tasks):
    ids = [m.id for m in client.models.list()]
    assert ids[0] == "tiny" and set(tasks) <= set(ids)
    assert client.models.retrieve("task-2").id == "task-2" and client.models.retrieve("tiny").id == "tiny"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("no-such-task")


def test_completions_equal_generate_greedy(client, server):
    out = client.completions.create(model="task-3", prompt="Hello there", max_tokens=5, temperature=0)
    ref = tgi(server, "task-3", "Hello there", 5)
    assert out.object == "text_completion" and out.model == "task-3"
    assert out.choices[0].text == ref["generated_text"]
    assert out.usage.completion_tokens == ref["details"]["generated_tokens"]
    assert out.usage.prompt_tokens == ref["details"]["prompt_tokens"]
    base = client.completions.create(model="tiny", prompt="Hello there", max_tokens=5, temperature=0)
    assert base.id.startswith("cmpl-")


def test_completions_stream(client):
    whole = client.completions.create(model="task-1", prompt="Once", max_tokens=6, temperature=0)
    chunks = list(client.completions.create(model="task-1", prompt="Once", max_tokens=6, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_chat_and_chat_stream(client, server):
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    out = client.chat.completions.create(model="task-2", messages=messages, max_tokens=5, temperature=0)
    msg = out.choices[0].message
    assert out.object == "chat.completion" and msg.role == "assistant"
    # The chat template of the tiny tokenizer, rendered by hand: the same greedy output via /generate.
    ref = tgi(server, "task-2", "<|system|>be brief\n<|user|>hi\n<|assistant|>", 5)
    assert msg.content == ref["generated_text"]
    chunks = list(client.chat.completions.create(model="task-2", messages=messages, max_tokens=5, temperature=0,
                                                 stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == msg.content
    assert chunks[-1].choices[0].finish_reason == out.choices[0].finish_reason


def test_openai_errors(client, server):
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="no-such-task", prompt="x", max_tokens=2)
    with pytest.raises(openai.UnprocessableEntityError):
        client.completions.create(model="task-0", prompt="x", max_tokens=2, n=2)
    with server.client() as c:
        assert_error(c.post("/v1/completions", json={"model": "task-0", "prompt": ["a", "b"]}), 422)
        with c.stream("POST", "/v1/completions", json={"model": "task-0", "prompt": "x", "max_tokens": 2,
                                                       "stream": True}) as r:
            events = sse_events(r)
        assert events[-1] == "[DONE]"


def test_chat_needs_a_chat_template(server, monkeypatch):
    monkeypatch.setattr(server.runtime.tokenizer, "chat_template", None)
    with server.client() as c:
        r = c.post("/v1/chat/completions", json={"model": "task-0", "messages": [{"role": "user", "content": "x"}]})
    assert "chat template" in assert_error(r, 422, "validation")["error"]
