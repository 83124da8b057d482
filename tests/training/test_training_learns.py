"""The trainer learns a task on a tiny Llama: varied prompts, all with the same short completion. After
training, greedy continuations of held-out prompts start with that completion (>= 90 %, the init: none),
and the validation loss falls by more than half."""

from __future__ import annotations

import random

import torch
from transformers import AutoModelForCausalLM

from prompt_store.init import random_init
from server.demo import demo_corpus, model_config, train_tokenizer
from server.training.examples import encode
from server.training.prompt_trainer import Hyperparameters, PromptTrainer, epoch_order

COMPLETION = " yes"


def _prompts(num: int, seed: int) -> list[str]:
    words = demo_corpus().split()
    rng = random.Random(seed)
    return [" ".join(rng.choice(words) for _ in range(rng.randint(1, 3))) for _ in range(num)]


def _greedy(model, prompt: torch.Tensor, ids: list[int], num: int) -> list[int]:
    """A cache-free greedy loop over `cat(P, E(ids))`: what the server computes for the request."""
    ids, out = list(ids), []
    with torch.no_grad():
        for _ in range(num):
            embeds = model.get_input_embeddings()(torch.tensor([ids]))
            inputs = torch.cat([prompt.unsqueeze(0).to(embeds.dtype), embeds], dim=1)
            token = int(model(inputs_embeds=inputs).logits[0, -1].argmax())
            out.append(token)
            ids.append(token)
    return out


def test_a_trained_prompt_makes_the_model_answer_the_completion():
    tokenizer = train_tokenizer(demo_corpus(), vocab_size=512)
    config = model_config("llama", tokenizer, hidden_size=128, num_layers=2, num_heads=4)
    config.initializer_range = 0.1  # peaked predictions, as a trained model makes (0.02 gives near-uniform ones)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval().requires_grad_(False)
    train = [encode(p, COMPLETION, tokenizer, is_encoder_decoder=False) for p in _prompts(200, seed=1)]
    held_out = _prompts(40, seed=2)
    validation = [encode(p, COMPLETION, tokenizer, is_encoder_decoder=False) for p in held_out]
    want = tokenizer(COMPLETION, add_special_tokens=False)["input_ids"]
    init = random_init(16, model.config.hidden_size, seed=0)
    hyper = Hyperparameters(n_epochs=12, batch_size=8, learning_rate=0.3)
    trainer = PromptTrainer(model, init, hyper, pad_token_id=tokenizer.eos_token_id)

    def share_answering(prompt: torch.Tensor) -> float:
        hits = [_greedy(model, prompt, tokenizer(p)["input_ids"], len(want)) == want for p in held_out]
        return sum(hits) / len(hits)

    before_loss, before_share = trainer.evaluate(validation, 8), share_answering(init)
    for epoch in range(hyper.n_epochs):
        order = epoch_order(len(train), epoch, seed=0)
        for start in range(0, len(order), hyper.batch_size):
            trainer.step([train[i] for i in order[start:start + hyper.batch_size]])
    after_loss, after_share = trainer.evaluate(validation, 8), share_answering(trainer.prompt.detach())
    assert before_share < 0.5, before_share
    assert after_share >= 0.9, (before_share, after_share, before_loss, after_loss)
    assert after_loss < before_loss / 2, (before_loss, after_loss)
