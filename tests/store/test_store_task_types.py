"""task_types: a store serving one kind of model refuses adapters of the other task type, everywhere."""

from __future__ import annotations

import pytest
import torch

from prompt_store import InvalidPrompt

S2S, CAUSAL = "SEQ_2_SEQ_LM", "CAUSAL_LM"


def assert_misfit(excinfo, task_id: str, task_type: str, fits: str) -> None:
    message = str(excinfo.value)
    assert f"task '{task_id}'" in message and "adapter_config.json" in message
    assert f"task_type '{task_type}' does not fit the served model" in message and fits in message


@pytest.fixture
def causal_only(make_store, tmp_path):
    return make_store(tmp_path / "shared", task_types=(CAUSAL,))


@pytest.fixture
def seq2seq_folder(make_store, tmp_path):
    """A valid SEQ_2_SEQ_LM adapter folder written by an unrestricted store on the same root as causal_only."""
    writer = make_store(tmp_path / "shared")
    writer.put("t5-task", torch.ones(3, 64), task_type=S2S)
    writer.put("llama-task", torch.ones(2, 64))
    return writer.root / "t5-task"


def test_every_write_refuses_a_type_the_model_cannot_serve(causal_only, seq2seq_folder):
    folder = seq2seq_folder
    writes = {
        "put": lambda: causal_only.put("w1", torch.ones(2, 64), task_type=S2S),
        "create_random": lambda: causal_only.create_random("w2", num_virtual_tokens=2, seed=0, task_type=S2S),
        "create_sample_vocab": lambda: causal_only.create_sample_vocab(
            "w3", num_virtual_tokens=2, word_embeddings=torch.ones(10, 64), task_type=S2S),
        "create_text": lambda: causal_only.create_text(
            "w4", "hi", num_virtual_tokens=2, tokenizer=lambda text: {"input_ids": [1, 2]},
            word_embeddings=torch.ones(10, 64), task_type=S2S),
        "put_adapter_files": lambda: causal_only.put_adapter_files(
            "w5", (folder / "adapter_config.json").read_bytes(), (folder / "adapter_model.safetensors").read_bytes()),
        "import_folder": lambda: causal_only.import_folder("w6", folder),
    }
    for i, (name, write) in enumerate(writes.items(), start=1):
        with pytest.raises(InvalidPrompt) as excinfo:
            write()
        assert_misfit(excinfo, f"w{i}", S2S, "takes CAUSAL_LM adapters")
        assert not (causal_only.root / f"w{i}").exists(), name
    assert causal_only.put("w1", torch.ones(2, 64)).task_type == CAUSAL  # its own type is fine


def test_get_and_acquire_refuse_a_stored_adapter_of_the_other_type(causal_only, seq2seq_folder):
    for call in (causal_only.get, causal_only.acquire):
        with pytest.raises(InvalidPrompt) as excinfo:
            call("t5-task")
        assert_misfit(excinfo, "t5-task", S2S, "CAUSAL_LM")
    assert causal_only.get("llama-task").num_virtual_tokens == 2  # the other tasks are served
    stats = causal_only.stats()
    assert stats.load_errors == 2 and stats.pinned == 0 and stats.device.num_entries == 1


def test_list_and_info_mark_the_other_type(causal_only, seq2seq_folder):
    infos = {info.task_id: info for info in causal_only.list()}
    assert infos["llama-task"].error is None
    misfit = infos["t5-task"]
    assert misfit.task_type == S2S and misfit.num_virtual_tokens == 3 and misfit.version != ""
    assert "does not fit the served model" in misfit.error and "CAUSAL_LM" in misfit.error
    assert causal_only.info("t5-task") == misfit


def test_a_seq2seq_store_refuses_causal_adapters(make_store, tmp_path):
    both = make_store(tmp_path / "r")  # default: both types, as before
    both.put("c", torch.ones(2, 64))
    both.put("s", torch.ones(2, 64), task_type=S2S)
    assert both.task_types == (CAUSAL, S2S) and all(i.error is None for i in both.list())
    seq2seq = make_store(tmp_path / "r", task_types=[S2S])
    assert seq2seq.get("s").task_type == S2S
    with pytest.raises(InvalidPrompt) as excinfo:
        seq2seq.get("c")
    assert_misfit(excinfo, "c", CAUSAL, "takes SEQ_2_SEQ_LM adapters")
    with pytest.raises(InvalidPrompt):
        seq2seq.put("c2", torch.ones(2, 64))  # put's default type is CAUSAL_LM
    assert make_store(tmp_path / "r", task_types=S2S).task_types == (S2S,)  # one name as a plain string


@pytest.mark.parametrize("bad", [(), ("CAUSAL",), ("CAUSAL_LM", "TOKEN_CLS")])
def test_unknown_or_empty_task_types_are_refused(make_store, bad):
    with pytest.raises(ValueError):
        make_store(task_types=bad)
