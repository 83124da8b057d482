"""SoftPrompt: one task's prompt-tuning embeddings as the server uses them."""

from __future__ import annotations

from dataclasses import dataclass

import torch

CAUSAL_LM = "CAUSAL_LM"
SEQ_2_SEQ_LM = "SEQ_2_SEQ_LM"
TASK_TYPES = (CAUSAL_LM, SEQ_2_SEQ_LM)


@dataclass(frozen=True)
class SoftPrompt:
    """A task's virtual-token embeddings, immutable once loaded (a new version is a new object)."""

    task_id: str
    version: str  # content hash of the tensor: changes whenever the weights change
    task_type: str
    embeddings: torch.Tensor  # [num_virtual_tokens, token_dim], on the store's device and dtype

    @property
    def num_virtual_tokens(self) -> int:
        return int(self.embeddings.shape[0])

    @property
    def token_dim(self) -> int:
        return int(self.embeddings.shape[1])

    @property
    def num_bytes(self) -> int:
        return self.embeddings.numel() * self.embeddings.element_size()
