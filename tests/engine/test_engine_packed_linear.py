"""Prepacked linear layers (server/engine/packed_linear.py): the same products as nn.Linear, eager and
compiled, with gradients through the original weights, and reversible."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from server.engine.paged.cpu import native_build, packed_linear, skinny_linear

pytestmark = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="PyTorch built without oneDNN")

TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1e-2}  # relative to the output's largest magnitude


def _model(dtype: torch.dtype) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 96), nn.GELU(), nn.Linear(96, 64, bias=False)).to(dtype)


def _relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.double() - want.double()).abs().max() / want.double().abs().max())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
# float32: the few-row kernel up to 20 rows (where built; plain below 16 elsewhere), packed from there, padded
# to a bucket (40 -> 40, 70 -> 96); plain above 256
@pytest.mark.parametrize("num_rows", [1, 5, 16, 40, 70, 300])
def test_packed_model_computes_what_the_plain_one_does(dtype, num_rows):
    model = _model(dtype)
    x = torch.randn(1, num_rows, 64).to(dtype)
    with torch.inference_mode():
        want = model(x)
        assert packed_linear.can_pack(model)
        num_bytes = packed_linear.pack(model)
        got = model(x)
    assert num_bytes == (64 * 96 + 96 * 64) * dtype.itemsize
    assert all(type(m) is packed_linear.PackedLinear for m in (model[0], model[2]))
    assert _relative_error(got, want) <= TOLERANCE[dtype]


def test_the_compiled_step_calls_the_packed_op():
    model = _model(torch.float32)
    x = torch.randn(1, 32, 64)
    want = model(x).detach()
    packed_linear.pack(model)
    compiled = torch.compile(model, dynamic=True)
    with torch.inference_mode():
        assert _relative_error(compiled(x), want) <= TOLERANCE[torch.float32]
        assert _relative_error(compiled(x[:, :3]), want[:, :3]) <= TOLERANCE[torch.float32]  # another row count


def test_gradients_flow_through_the_original_weights():
    model = _model(torch.float32).requires_grad_(False)
    packed_linear.pack(model)
    x = torch.randn(3, 64, requires_grad=True)
    model(x).sum().backward()  # training a soft prompt needs the input's gradient through a frozen model
    plain = x.detach().clone().requires_grad_(True)
    reference = _model(torch.float32).requires_grad_(False)
    reference(plain).sum().backward()
    assert torch.allclose(x.grad, plain.grad, atol=1e-5)


def test_unpack_restores_plain_linears_and_the_state_dict_never_changes():
    model = _model(torch.float32)
    keys = set(model.state_dict())
    packed_linear.pack(model)
    assert set(model.state_dict()) == keys  # the packed copies are not parameters or buffers
    packed_linear.unpack(model)
    assert all(type(m) is nn.Linear and not hasattr(m, "packed_weight") for m in (model[0], model[2]))


def test_float64_and_other_devices_are_left_alone():
    assert not packed_linear.can_pack(_model(torch.float64))
    model = _model(torch.float64)
    assert packed_linear.pack(model) == 0
    assert type(model[0]) is nn.Linear
    x = torch.randn(2, 64, dtype=torch.float64)
    assert torch.equal(model(x), F.linear(F.gelu(F.linear(x, model[0].weight, model[0].bias)), model[2].weight))


def test_nothing_is_packed_when_the_copies_would_not_fit_in_half_the_free_memory():
    model = _model(torch.float32)
    needed = packed_linear.linear_bytes(model)
    assert needed == (64 * 96 + 96 * 64) * 4
    assert packed_linear.pack_within(model, free_bytes=2 * needed - 1) is None
    assert type(model[0]) is nn.Linear
    assert packed_linear.pack_within(model, free_bytes=2 * needed) == needed
    assert type(model[0]) is packed_linear.PackedLinear


def test_row_counts_share_a_few_buckets():
    """oneDNN keeps a primitive per row count: the packed product sees at most 14 per weight."""
    buckets = {packed_linear.row_bucket(n) for n in range(1, packed_linear.MAX_PACKED_ROWS + 1)}
    assert len(buckets) == 14 and all(packed_linear.row_bucket(n) >= n for n in range(1, 257))


def test_large_float32_weights_take_the_packed_product_from_three_rows(monkeypatch):
    """Where the few-row kernel did not build: an output layer of a real vocabulary is streamed faster packed
    from a few rows on (SmolLM2's 49152 x 576 head); small weights keep the plain product up to 16 rows."""
    model = _model(torch.float32)
    x = torch.randn(1, 4, 64)
    want = model(x).detach()
    packed_linear.pack(model)
    monkeypatch.setitem(native_build.made, skinny_linear.SOURCE, None)
    calls = []
    original = torch.ops.mkldnn._linear_pointwise
    monkeypatch.setattr(torch.ops.mkldnn, "_linear_pointwise", lambda *a: calls.append(1) or original(*a))
    with torch.inference_mode():
        model(x)
        assert not calls  # 64 x 96 is small: plain below 16 rows
        monkeypatch.setattr(packed_linear, "LARGE_WEIGHT", 64 * 64)
        got = model(x)
    assert len(calls) == 2 and _relative_error(got, want) <= TOLERANCE[torch.float32]
