"""The trainer is PEFT's prompt tuning, exactly: with the same data, order, init and hyperparameters, 20
AdamW steps in float32 give the prompt that `get_peft_model` plus the same loop gives (within 1e-5), with
the same losses, for a causal LM (Llama) and for T5 (one prompt block, as the store writes it)."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

from prompt_store.init import random_init
from server.training.examples import encode
from server.training.prompt_trainer import Hyperparameters, PromptTrainer, epoch_order, num_counted, right_padded

PAIRS = [("The river runs", " past the mill"), ("A cat sat", " on the mat today"), ("Bread and", " butter"),
         ("Once upon a time", " there was a king"), ("Hi", " there"), ("The old mill", " stood still"),
         ("Rain fell on", " the town all night"), ("She said", " hello")]
NUM_VIRTUAL, STEPS, BATCH = 5, 20, 3
HYPER = Hyperparameters(n_epochs=100, batch_size=BATCH, learning_rate=1e-2, weight_decay=0.01)


def _frozen(model):
    model.eval()
    model.requires_grad_(False)
    return model


def _batches(examples):
    """STEPS batches of BATCH examples, epoch after epoch in epoch_order."""
    out, epoch = [], 0
    while len(out) < STEPS:
        order = epoch_order(len(examples), epoch, seed=7)
        out += [[examples[i] for i in order[s:s + BATCH]] for s in range(0, len(order), BATCH)]
        epoch += 1
    return out[:STEPS]


def _peft_run(model, task_type, init, batches, pad_id, is_encoder_decoder):
    from peft import PromptTuningConfig, get_peft_model

    config = PromptTuningConfig(task_type=task_type, num_virtual_tokens=NUM_VIRTUAL,
                                num_transformer_submodules=1 if is_encoder_decoder else None)
    peft_model = get_peft_model(model, config)
    peft_model.eval()
    weight = peft_model.prompt_encoder["default"].embedding.weight
    with torch.no_grad():
        weight.copy_(init)
    trainable = [p for p in peft_model.parameters() if p.requires_grad]
    assert len(trainable) == 1 and trainable[0] is weight
    optimizer = torch.optim.AdamW(trainable, lr=HYPER.learning_rate, weight_decay=HYPER.weight_decay)
    losses = []
    for batch in batches:
        ids, mask = right_padded([e.input_ids for e in batch], pad_id, "cpu")
        labels, _ = right_padded([e.labels for e in batch], -100, "cpu")
        optimizer.zero_grad()
        loss = peft_model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        optimizer.step()
        losses.append(float(loss))
    return weight.detach().clone(), losses


def _ours(model, init, batches, pad_id, part_size=None):
    trainer = PromptTrainer(_frozen(model), init, HYPER, pad_token_id=pad_id)
    if part_size is None:
        losses = [trainer.step(batch) for batch in batches]
    else:  # each step taken in parts (the server's slices under load), the gradient accumulated
        losses = []
        for batch in batches:
            losses.append(sum(trainer.accumulate(batch[i:i + part_size], num_counted(batch))
                              for i in range(0, len(batch), part_size)))
            trainer.apply()
    assert all(p.grad is None for p in model.parameters())  # the base model got no gradient
    return trainer.prompt.detach().clone(), losses


def _check(ours, theirs, init):
    (prompt, losses), (peft_prompt, peft_losses) = ours, theirs
    assert (prompt - init).abs().max() > 1e-3  # it trained
    assert torch.allclose(prompt, peft_prompt, atol=1e-5, rtol=0), (prompt - peft_prompt).abs().max()
    assert losses == pytest.approx(peft_losses, rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("part_size", [None, 1], ids=["whole-batches", "one-example-slices"])
def test_causal_lm_training_equals_peft(tiny_model_dir, part_size):
    folder = tiny_model_dir("llama")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    examples = [encode(p, c, tokenizer, is_encoder_decoder=False) for p, c in PAIRS]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    batches = _batches(examples)
    init = random_init(NUM_VIRTUAL, AutoModelForCausalLM.from_pretrained(folder).config.hidden_size, seed=3)
    ours = _ours(AutoModelForCausalLM.from_pretrained(folder), init, batches, pad_id, part_size)
    theirs = _peft_run(_frozen(AutoModelForCausalLM.from_pretrained(folder)), "CAUSAL_LM", init, batches, pad_id,
                       False)
    _check(ours, theirs, init)


def test_t5_training_equals_peft(tmp_path):
    from server.demo import demo_corpus, train_tokenizer
    from tests.engine.conftest import seq2seq_config

    tokenizer = train_tokenizer(demo_corpus(), vocab_size=512)
    torch.manual_seed(0)
    AutoModelForSeq2SeqLM.from_config(seq2seq_config("t5", tokenizer)).save_pretrained(tmp_path)
    examples = [encode(p, c, tokenizer, is_encoder_decoder=True) for p, c in PAIRS]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    batches = _batches(examples)
    init = random_init(NUM_VIRTUAL, AutoModelForSeq2SeqLM.from_pretrained(tmp_path).config.d_model, seed=3)
    ours = _ours(AutoModelForSeq2SeqLM.from_pretrained(tmp_path), init, batches, pad_id)
    theirs = _peft_run(_frozen(AutoModelForSeq2SeqLM.from_pretrained(tmp_path)), "SEQ_2_SEQ_LM", init, batches,
                       pad_id, True)
    _check(ours, theirs, init)
