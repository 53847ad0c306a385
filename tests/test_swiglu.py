"""Tests for course_utils.swiglu: the same numbers as the model's own MLP, one tensor fewer kept."""

import pytest
import torch
import torch.nn.functional as F

from course_utils import assets, memory, swiglu, train


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


def _saved_intermediate_tensors(model, x) -> int:
    """Distinct tensors of intermediate_size per row that one MLP's forward keeps for backward."""
    mlp = model.model.layers[0].mlp
    width = model.config.intermediate_size
    kept = {}

    def pack(tensor):
        if tuple(tensor.shape) == (len(x), width):  # rows x intermediate: not a weight
            kept[tensor.untyped_storage().data_ptr()] = tensor
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        mlp(x)
    return len(kept)


def test_a_patched_mlp_keeps_the_tensors_the_estimator_counts():
    """memory.MLPS says 4 tensors of intermediate_size for the stock MLP, 3 for swiglu: count them."""
    model = assets.tiny_llama(intermediate_size=48)  # 48 != every other width of the tiny model
    x = torch.randn(5, model.config.hidden_size, requires_grad=True)
    assert _saved_intermediate_tensors(model, x) == memory.MLPS["standard"]
    swiglu.patch_mlp(model)
    assert _saved_intermediate_tensors(model, x) == memory.MLPS["swiglu"]


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
