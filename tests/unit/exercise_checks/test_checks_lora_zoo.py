"""Lesson 12's exercise checks: the usual mistakes get the hint that names them."""

import math

import pytest
import torch

from course_utils import assets, lora, memory, methods
from course_utils.exercise_checks import lora_zoo as check

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # PEFT's notices about toy models


@pytest.fixture(autouse=True)
def _learner(monkeypatch):
    monkeypatch.delenv("NBGRADER_EXECUTION", raising=False)


def _said(capsys) -> str:
    return capsys.readouterr().out.strip()


def _scaling(r, alpha, rslora=False):
    return alpha / math.sqrt(r) if rslora else alpha / r


@pytest.mark.parametrize(
    ("answer", "hint"),
    [
        (lambda r, alpha, rslora=False: alpha / r, "square root of r, not by r"),
        (lambda r, alpha, rslora=False: alpha // r, "use / not //"),
        (lambda r, alpha, rslora=False: r / alpha, "not r by alpha"),
        (lambda r, alpha, rslora=False: lora.lora_scaling(r, alpha, rslora), "lora.lora_scaling"),
        (lambda r, alpha, rslora=False: str(alpha / r), "return a number"),
    ],
)
def test_scaling_mistakes(answer, hint, capsys):
    check.scaling(answer)
    said = _said(capsys)
    assert said.startswith("❌ Exercise 1") and hint in said, said


def test_scaling_right_reports_the_sizes(capsys):
    check.scaling(_scaling)
    said = _said(capsys)
    assert said.startswith("✅ Exercise 1: `scaling` passes the tests."), said
    assert "rsLoRA (alpha=16)" in said


def _per_layer(method, d_in, d_out, r):
    if method not in methods.METHODS:
        raise ValueError(method)
    if method == "vera":
        return r + d_out
    if method == "lora-fa":
        return r * d_out
    return r * (d_in + d_out) + (d_out if method == "dora" else 0)


def _total(per_layer=_per_layer, layers=True, swap=False):
    """A trainable_params built on `per_layer`, without the layers or with (d_out, d_in)."""

    def trainable_params(config, method, r=16, targets="all-linear"):
        shapes = memory.linear_layer_shapes(config)
        names = list(shapes) if targets == "all-linear" else list(targets)
        total = sum(per_layer(method, *shapes[n][:: -1 if swap else 1], r) for n in names)
        return total * (memory.get_config(config)["num_hidden_layers"] if layers else 1)

    return trainable_params


def _without(method_to_break, value):
    """A per-layer count that is wrong for one method."""

    def per_layer(method, d_in, d_out, r):
        if method == method_to_break:
            return value(d_in, d_out, r)
        return _per_layer(method, d_in, d_out, r)

    return per_layer


@pytest.mark.parametrize(
    ("per_layer", "total", "hint"),
    [
        (_without("dora", lambda i, o, r: r * (i + o)), None, "DoRA also trains the magnitude"),
        (_without("lora-fa", lambda i, o, r: r * i), None, "A (r x d_in) is the frozen one"),
        (_without("vera", lambda i, o, r: r * (i + o)), None, "A and B are frozen and shared"),
        (_per_layer, _total(layers=False), "multiply by num_hidden_layers"),
        (_per_layer, _total(swap=True), "(d_in, d_out), in that order"),
    ],
)
def test_trainable_params_mistakes(per_layer, total, hint, capsys):
    check.trainable_params(per_layer, total or _total(per_layer))
    said = _said(capsys)
    assert said.startswith("❌ Exercise 2") and hint in said, said


def test_trainable_params_calling_the_formula_is_refused(capsys):
    def total(config, method, r=16, targets="all-linear"):
        return methods.trainable_parameter_formula(config, method, r=r, targets=targets)

    check.trainable_params(_per_layer, total)
    assert "called methods.trainable_parameter_formula" in _said(capsys)


def test_an_unknown_method_must_raise_value_error(capsys):
    def per_layer(method, d_in, d_out, r):
        return r * (d_in + d_out)

    check.trainable_params(per_layer, _total(per_layer), cases=[], models=[], unknown=["qlora"])
    said = _said(capsys)
    assert said.startswith("❌ Exercise 2") and "must raise ValueError" in said, said


def test_trainable_params_right_reports_the_zoo(capsys):
    check.trainable_params(_per_layer, _total())
    said = _said(capsys)
    assert said.startswith("✅ Exercise 2: `trainable_per_layer` and `trainable_params` pass"), said
    assert "SmolLM2-135M, r=16 on all linear layers:" in said


def _weight(norm_of="V", detach=True, bias=True):
    """dora_weight with one mistake (norm of W alone, no detach) and a matching dora_forward."""

    def dora_weight(layer):
        W = layer.base_layer.weight
        A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        m = layer.lora_magnitude_vector["default"].weight
        V = W + layer.scaling["default"] * (B @ A)
        norm = torch.linalg.norm(V if norm_of == "V" else W, dim=1)
        return (m / (norm.detach() if detach else norm))[:, None] * V

    def dora_forward(layer, x):
        h = x @ dora_weight(layer).T
        if bias and layer.base_layer.bias is not None:
            h = h + layer.base_layer.bias
        return h

    return dora_weight, dora_forward


@pytest.mark.parametrize(
    ("answer", "hint"),
    [
        (_weight(detach=False), "treat them as a constant"),
        (_weight(norm_of="W"), "not of W alone"),
        ((_weight()[0], lambda layer, x: layer(x)), "dora_forward called the layer"),
        ((lambda layer: layer.base_layer.weight * 2, _weight()[1]), "differs from PEFT's merged"),
    ],
)
def test_dora_mistakes(answer, hint, capsys):
    check.dora_forward(*answer)
    said = _said(capsys)
    assert said.startswith("❌ Exercise 3") and hint in said, said


def test_dora_row_scale_without_a_column_gets_the_shape_hint(capsys):
    def dora_weight(layer):
        W = layer.base_layer.weight
        m = layer.lora_magnitude_vector["default"].weight
        return m * W / torch.linalg.norm(W, dim=1)  # k_proj: 32 rows, 64 columns

    check.dora_forward(dora_weight, _weight()[1])
    said = _said(capsys)
    assert said.startswith("❌ Exercise 3: dora_weight failed") and "[:, None]" in said, said


def _biased_q_proj():
    """q_proj of a tiny Llama with biases, wrapped in DoRA, B moved away from 0."""
    model = assets.tiny_llama(seed=5, attention_bias=True)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.copy_(torch.randn(param.shape, generator=torch.Generator().manual_seed(5)))
    model = methods.apply_method(
        model, "dora", r=8, alpha=8, target_modules=["q_proj"], verbose=False
    )
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05, generator=torch.Generator().manual_seed(6))
    return model.base_model.model.model.layers[0].self_attn.q_proj


def test_dora_forward_without_the_bias_is_named(capsys):
    check.dora_forward(*_weight(bias=False), cases=[(_biased_q_proj(), (5,), 0)])
    said = _said(capsys)
    assert said.startswith("❌ Exercise 3") and "bias is missing" in said, said


def test_dora_right_reports_the_row_lengths(capsys):
    check.dora_forward(*_weight())
    said = _said(capsys)
    assert said.startswith("✅ Exercise 3: `dora_weight` and `dora_forward` pass the tests."), said
    assert "row lengths of W' = m exactly: True" in said
