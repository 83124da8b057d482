"""Prepacked linear layers for the slot engine on CPU: each weight is reordered once into oneDNN's blocked
layout, so that a step's matrix products skip the per-call packing that `aten::linear` does.

Measured on the benchmark's 8-layer 512-wide Llama (2-core Xeon with AMX), a decode step of 32 rows spends
a third less time in its matrix products in bfloat16 (at every row count) and a fifth less in float32 (from
about 16 rows). Where the few-row kernel builds (skinny_linear.py), float32 products of 1 to 20 rows and
bfloat16 ones of 1 to 7 go to it; else float32 ones below 16 rows go to `aten::linear`. The cost is a second
copy of every linear weight: the originals stay, for anything that runs the model outside the engine's step
(the probe, PEFT comparisons, training with gradients). The engine packs only when the copies fit in half
the free memory.

Stock transformers modules are kept: each `nn.Linear` becomes a `PackedLinear` (its class only; weights,
hooks and state dict unchanged). The product is one opaque custom op, so a compiled step calls it as it is.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from server.engine.paged.cpu import skinny_linear

DTYPES = (torch.float32, torch.bfloat16)
MAX_FREE_FRACTION = 0.5  # the packed copies may take at most this share of the free memory (KV comes after)
# float32 rows below which the plain product is faster than the packed one (measured on the 8x512 model's
# weights, up to 2048 x 512: equal at ~16). Large weights differ: from 3 rows, aten::linear streams
# SmolLM2's 49152 x 576 output layer (113 MB) more slowly than the packed product; packing it from 3 rows
# made the engine 4 % faster at 4 rows and 12 % at 8 (SmolLM2, float32, in process, 3 rounds each).
MIN_FLOAT32_ROWS = 16
LARGE_WEIGHT = 4 * 1024 * 1024  # elements: from here, packed from MIN_FLOAT32_ROWS_LARGE rows
MIN_FLOAT32_ROWS_LARGE = 3
# oneDNN builds and caches a primitive per row count, with buffers sized for it: about 0.6 MiB each, and
# up to its cache's 1,024 entries (measured: random row counts up to 1,300 grew a process by 750 MiB, and
# a server by 50 MiB per 1,000 requests). Row counts are therefore rounded up to a few buckets (multiples
# of 8 to 64, of 32 to 256: 14 shapes per weight), and steps of more rows, prefill chunks that are bound by
# arithmetic rather than by packing, take the plain product.
MAX_PACKED_ROWS = 256


class PackedLinear(nn.Linear):
    """An `nn.Linear` that also holds its weight reordered for oneDNN (`packed_weight`)."""

    packed_weight: torch.Tensor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad):
            return F.linear(x, self.weight, self.bias)  # the packed op has no backward
        return torch.ops.promptserve.packed_linear(x, self.weight, self.packed_weight, self.bias)


def can_pack(model: nn.Module) -> bool:
    """Whether `pack` applies: a CPU model in float32 or bfloat16, and PyTorch built with oneDNN."""
    weight = next(model.parameters())
    return weight.device.type == "cpu" and weight.dtype in DTYPES and torch.backends.mkldnn.is_available()


def linear_bytes(model: nn.Module) -> int:
    """What `pack` would add: the bytes of every plain `nn.Linear` weight it covers."""
    return sum(m.weight.numel() * m.weight.element_size() for m in _packable(model))


def pack_within(model: nn.Module, free_bytes: int) -> int | None:
    """`pack(model)` when the copies fit in MAX_FREE_FRACTION of `free_bytes`; None (nothing packed) if not."""
    if linear_bytes(model) > MAX_FREE_FRACTION * free_bytes:
        return None
    return pack(model)


def pack(model: nn.Module) -> int:
    """Turn every `nn.Linear` of `model` into a `PackedLinear`; returns the bytes the packed copies take.
    Also builds the few-row kernel (skinny_linear.py) that the packed op uses for a few rows."""
    skinny_linear.load()
    num_bytes = 0
    for module in _packable(model):
        module.packed_weight = torch.ops.mkldnn._reorder_linear_weight(module.weight.detach())
        module.__class__ = PackedLinear
        num_bytes += module.weight.numel() * module.weight.element_size()
    return num_bytes


def unpack(model: nn.Module) -> None:
    """Undo `pack` (the packed copies are freed)."""
    for module in model.modules():
        if type(module) is PackedLinear:
            module.__class__ = nn.Linear
            del module.packed_weight


def _packable(model: nn.Module) -> list[nn.Linear]:
    return [m for m in model.modules() if type(m) is nn.Linear and m.weight.dtype in DTYPES]


def _packed_linear(x: torch.Tensor, weight: torch.Tensor, packed: torch.Tensor,
                   bias: torch.Tensor | None) -> torch.Tensor:
    """`F.linear(x, weight, bias)`, through the packed weight or the few-row kernel where one is faster."""
    num_rows = x.numel() // x.shape[-1]
    skinny = skinny_linear.loaded()
    if skinny is not None and num_rows <= skinny_linear.MAX_ROWS:
        rows = x.reshape(num_rows, x.shape[-1])
        if skinny.covers(rows, weight):
            return skinny.run(rows, weight, bias).reshape(*x.shape[:-1], weight.shape[0])
    if num_rows > MAX_PACKED_ROWS or (x.dtype == torch.float32 and num_rows < _min_float32_rows(weight)):
        return F.linear(x, weight, bias)
    bucket = row_bucket(num_rows)
    rows = x.reshape(num_rows, x.shape[-1])
    if bucket != num_rows:
        rows = F.pad(rows, (0, 0, 0, bucket - num_rows))
    out = torch.ops.mkldnn._linear_pointwise(rows, packed, bias, "none", [], "")
    return out[:num_rows].reshape(*x.shape[:-1], out.shape[-1])


def _min_float32_rows(weight: torch.Tensor) -> int:
    return MIN_FLOAT32_ROWS_LARGE if weight.numel() >= LARGE_WEIGHT else MIN_FLOAT32_ROWS


def row_bucket(num_rows: int) -> int:
    """The row count the packed product runs at: multiples of 8 up to 64, of 32 up to MAX_PACKED_ROWS."""
    step = 8 if num_rows <= 64 else 32
    return -(-num_rows // step) * step


# Registered through torch.library directly, not `custom_op`: its per-call Python wrappers cost about 2 of
# the 4.5 us a call spends outside the product, and a step makes 57 of them. One kernel for every backend
# key (the packed weight is an MKLDNN tensor), no autograd (PackedLinear.forward never calls it with grads).
_LIBRARY = torch.library.Library("promptserve", "FRAGMENT")
_LIBRARY.define("packed_linear(Tensor x, Tensor weight, Tensor packed, Tensor? bias) -> Tensor")
_LIBRARY.impl("packed_linear", _packed_linear, "CompositeExplicitAutograd")


@torch.library.register_fake("promptserve::packed_linear")
def _(x, weight, packed, bias):
    return x.new_empty(*x.shape[:-1], weight.shape[0])
