"""PromptTrainer: PEFT prompt tuning over the frozen, shared base model.

The trainable prompt P `[n, D]` (float32) is the only parameter, optimised with AdamW; the base model's
weights get no gradient and no optimizer state. A step is what `PeftModelFor{CausalLM,Seq2SeqLM}.forward`
computes with labels:
- causal: `model(inputs_embeds=cat(P, E(ids)), attention_mask=cat(1s, mask), labels=cat(-100s, labels))`;
- seq2seq (one prompt block, `num_transformer_submodules=1`, as the store writes it): the encoder gets
  `cat(P, E(ids))`, the decoder the labels shifted right (the model does that itself).
The loss is the model's own cross-entropy, the mean over the batch's counted tokens. Batches are padded on
the right, so each row's positions and attention are those of the example alone. The model stays in
eval mode: its dropout is off (the prompt is the only thing that changes).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from server.training.examples import IGNORE, Example


@dataclass(frozen=True)
class Hyperparameters:
    """OpenAI's names where they exist."""

    n_epochs: int = 3
    batch_size: int = 8
    learning_rate: float = 3e-2  # soft prompts train with large steps (PEFT's examples use 3e-2)
    weight_decay: float = 0.01  # torch's AdamW default


class PromptTrainer:
    """Trains one soft prompt; `step(batch)` returns that batch's loss before the update."""

    def __init__(self, model: Any, prompt: torch.Tensor, hyperparameters: Hyperparameters, *, pad_token_id: int):
        self.model = model
        self.is_encoder_decoder = bool(getattr(model.config, "is_encoder_decoder", False))
        self.prompt = torch.nn.Parameter(prompt.detach().to(torch.float32).clone())  # [n, D]
        self.optimizer = torch.optim.AdamW([self.prompt], lr=hyperparameters.learning_rate,
                                           weight_decay=hyperparameters.weight_decay)
        self._pad = pad_token_id
        self._device = model.get_input_embeddings().weight.device
        self.num_steps = 0

    def step(self, batch: list[Example]) -> float:
        """One AdamW update of the prompt on `batch`; its loss before the update."""
        loss = self.accumulate(batch, num_counted(batch))
        self.apply()
        return loss

    def accumulate(self, part: list[Example], num_counted_in_batch: int) -> float:
        """Add the gradient of `part` of a batch (its share of the batch's mean loss); returns that share.
        A batch taken part by part gets the gradient of the whole batch: the loss is a mean over counted
        tokens, so each part's mean is weighted by its tokens. This lets a step be split into short slices."""
        weight = num_counted(part) / num_counted_in_batch
        loss = self._loss(part) * weight if weight != 1 else self._loss(part)
        loss.backward()
        return float(loss.detach())

    def apply(self) -> None:
        """The AdamW update with the gradient accumulated since the last one."""
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.num_steps += 1

    def evaluate(self, examples: list[Example], batch_size: int) -> float:
        """Mean loss per counted token over `examples` (validation), no update."""
        total, count = 0.0, 0
        with torch.no_grad():
            for start in range(0, len(examples), batch_size):
                batch = examples[start:start + batch_size]
                num = num_counted(batch)
                total += float(self._loss(batch)) * num
                count += num
        return total / max(count, 1)

    def state_dict(self) -> dict:
        """Prompt and optimizer state (a checkpoint)."""
        return {"prompt": self.prompt.detach().clone(), "optimizer": self.optimizer.state_dict(),
                "num_steps": self.num_steps}

    def load_state_dict(self, state: dict) -> None:
        """Resume from `state_dict()`."""
        with torch.no_grad():
            self.prompt.copy_(state["prompt"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.num_steps = state["num_steps"]

    def _loss(self, batch: list[Example]) -> torch.Tensor:
        ids, mask = right_padded([e.input_ids for e in batch], self._pad, self._device)  # [B, L]
        embeds = self.model.get_input_embeddings()(ids)  # [B, L, D]
        num_rows, n = ids.shape[0], self.prompt.shape[0]
        prompts = self.prompt.to(embeds.dtype).unsqueeze(0).expand(num_rows, -1, -1)  # [B, n, D]
        inputs = torch.cat([prompts, embeds], dim=1)
        mask = torch.cat([torch.ones(num_rows, n, dtype=mask.dtype, device=self._device), mask], dim=1)
        labels, _ = right_padded([e.labels for e in batch], IGNORE, self._device)
        if not self.is_encoder_decoder:
            labels = torch.cat([torch.full((num_rows, n), IGNORE, dtype=labels.dtype, device=self._device), labels],
                               dim=1)
        return self.model(inputs_embeds=inputs, attention_mask=mask, labels=labels).loss


def epoch_order(num_examples: int, epoch: int, seed: int) -> list[int]:
    """The examples' order in `epoch`: a permutation drawn from (seed, epoch), the same on every run."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(num_examples, generator=generator).tolist()


def right_padded(rows: list[list[int]], pad: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    values = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        values[i, :len(row)] = torch.tensor(row, dtype=torch.long)
        mask[i, :len(row)] = 1
    return values.to(device), mask.to(device)


def num_counted(examples: list[Example]) -> int:
    """Tokens the loss counts: every label but -100 (a causal row's labels follow its virtual tokens, so
    even its first text label is predicted, from the last virtual token)."""
    return sum(1 for e in examples for label in e.labels if label != IGNORE)
