"""Tests for course_utils.swiglu: the same numbers as the stock MLP, two fewer tensors kept."""

import pytest
import torch
import torch.nn.functional as F

from course_tools import train
from course_utils import assets, memory, swiglu
from course_utils.peak_memory import PeakMemory


def _two_op(gate, up):
    """The MLP's own SiLU(gate) * up: two PyTorch ops."""
    return F.silu(gate) * up


def _grads(fn, gate, up, grad):
    """Output and input gradients of fn(gate, up) for the upstream gradient `grad`."""
    gate, up = gate.clone().requires_grad_(), up.clone().requires_grad_()
    out = fn(gate, up)
    out.backward(grad)
    return out.detach(), gate.grad, up.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_swiglu_equals_the_two_ops_bit_for_bit(dtype):
    torch.manual_seed(0)
    gate, up, grad = (torch.randn(3, 7, 96, dtype=dtype) * 4 for _ in range(3))
    ours = _grads(swiglu.swiglu, gate, up, grad)
    theirs = _grads(_two_op, gate, up, grad)
    for a, b in zip(ours, theirs, strict=True):
        assert torch.equal(a, b)


def test_swiglu_without_gradients_returns_the_same_numbers_and_no_graph():
    gate, up = torch.randn(4, 32), torch.randn(4, 32)
    with torch.no_grad():
        out = swiglu.swiglu(gate, up)
    assert out.grad_fn is None and torch.equal(out, _two_op(gate, up))


def test_only_one_input_trainable_gets_its_gradient():
    gate, up = torch.randn(4, 32, requires_grad=True), torch.randn(4, 32)
    swiglu.swiglu(gate, up).sum().backward()
    expected = torch.autograd.grad(_two_op(gate, up).sum(), gate)[0]
    assert torch.equal(gate.grad, expected) and up.grad is None


def _kept_intermediate_tensors(mlp, x, width: int) -> float:
    """How many tensors of rows x `width` one MLP's forward leaves alive for the backward pass.

    Measured as bytes (`PeakMemory`), not by a saved-tensor hook: the patched MLP keeps
    the usual tensors under another hook, so a counting hook would change what it counts.
    """
    with PeakMemory("cpu") as meter:
        with meter.phase("forward"):
            out = mlp(x)
    forward = meter.phases["forward"]
    kept = forward["end"] - forward["start"] - out.nbytes
    return kept / (len(x) * width * x.element_size())


def test_a_patched_mlp_keeps_the_tensors_the_estimator_counts():
    """memory.MLPS: 4 tensors of intermediate_size for the stock MLP, 2 for swiglu; count them."""
    model = assets.tiny_llama(intermediate_size=48)
    mlp, width = model.model.layers[0].mlp, model.config.intermediate_size
    x = torch.randn(5, model.config.hidden_size, requires_grad=True)
    assert _kept_intermediate_tensors(mlp, x, width) == memory.MLPS["standard"] == 4
    swiglu.patch_mlp(model)
    assert _kept_intermediate_tensors(mlp, x, width) == memory.MLPS["swiglu"] == 2
    with torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):  # another hook:
        assert _kept_intermediate_tensors(mlp, x, width) == 3  # the product is saved as usual


def test_a_patched_lora_mlp_recomputes_the_product_for_the_adapter_too():
    model = train.prepare_model(
        assets.tiny_llama(intermediate_size=48), "lora", lora=train.lora_config(r=4)
    )
    mlp = model.get_base_model().model.layers[0].mlp
    width = model.config.intermediate_size
    x = torch.randn(5, model.config.hidden_size, requires_grad=True)
    standard = _kept_intermediate_tensors(mlp, x, width)
    swiglu.patch_mlp(model)
    assert standard - _kept_intermediate_tensors(mlp, x, width) == pytest.approx(2)  # SiLU, product


def test_the_recomputed_product_gives_the_stock_gradients_bit_for_bit():
    torch.manual_seed(0)
    model = assets.tiny_llama(intermediate_size=48)
    mlp = model.model.layers[0].mlp
    x, grad = (torch.randn(2, 5, model.config.hidden_size) for _ in range(2))

    def grads():
        mlp.zero_grad(set_to_none=True)
        inputs = x.clone().requires_grad_()
        out = mlp(inputs)
        out.backward(grad)
        return [out.detach(), inputs.grad] + [p.grad for p in mlp.parameters()]

    stock = grads()
    swiglu.patch_mlp(model)
    ours = grads()
    assert all(torch.equal(a, b) for a, b in zip(ours, stock, strict=True))


def test_a_patched_model_gives_the_same_logits_and_gradients_lora_included():
    def logits_and_grads(patched: bool):
        model = train.prepare_model(assets.tiny_llama(), "lora", lora=train.lora_config(r=4))
        if patched:
            assert swiglu.patch_mlp(model) == model.config.num_hidden_layers
        ids = torch.arange(24).reshape(2, 12)
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
        return out.logits.detach(), grads

    (logits, grads), (own_logits, own_grads) = logits_and_grads(True), logits_and_grads(False)
    assert torch.equal(logits, own_logits)
    assert grads.keys() == own_grads.keys() and len(grads) > 0
    assert all(torch.equal(grads[name], own_grads[name]) for name in grads)


def test_unpatch_gives_the_mlp_its_own_forward_back():
    model = assets.tiny_llama()
    swiglu.patch_mlp(model)
    swiglu.unpatch_mlp(model)
    assert all("forward" not in vars(layer.mlp) for layer in model.model.layers)


def test_bad_input_raises_helpful_errors():
    with pytest.raises(ValueError, match="same shape"):
        swiglu.swiglu(torch.zeros(2, 3), torch.zeros(2, 4))
    with pytest.raises(TypeError, match="two tensors"):
        swiglu.swiglu([1.0], torch.zeros(1))
    with pytest.raises(TypeError, match="torch model"):
        swiglu.patch_mlp("SmolLM2")
    with pytest.raises(ValueError, match="Llama-style"):
        swiglu.patch_mlp(torch.nn.Linear(3, 3))
    assert swiglu.patch_mlp(torch.nn.Linear(3, 3), missing_ok=True) == 0
