"""Checks for the exercises of lesson 12 (The LoRA zoo): rsLoRA's scale, counts, a DoRA layer.

The checks compare with PEFT itself, on tiny random Llamas wrapped by
`course_utils.methods.apply_method` as lesson 12 wraps SmolLM2, and with the course's
`lora.lora_scaling` and `methods.trainable_parameter_formula` (which the learner may not call).
"""

from __future__ import annotations

import copy
import math
from unittest import mock

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from course_utils import assets, lora, memory, methods
from course_utils.exercise_checks.feedback import Wrong, allclose, equal, exercise, expect, isclose

TINY = dict(assets.TINY_LLAMA)
#: Bound at import: the course's scale, which the learner's `scaling` may not call.
_course_scaling = lora.lora_scaling


def _zoo_model(method, r=8, alpha=16, target_modules="all-linear", seed=0, **shape):
    """The notebook's zoo_model: a tiny Llama wrapped for `method` by methods.apply_method."""
    model = assets.tiny_llama(seed=seed, **shape)
    return methods.apply_method(
        model, method, r=r, alpha=alpha, target_modules=target_modules, verbose=False
    )


# Exercise 1: the scale of LoRA and rsLoRA.


def _refuse_lora_scaling(*args, **kwargs):
    raise Wrong(
        "scaling called lora.lora_scaling. "
        "Hint: compute the scale yourself from r and alpha, as the text above says."
    )


def _peft_scaling(r, alpha, rslora) -> float:
    """The scale PEFT computes for a q_proj adapter of rank r built by methods.apply_method."""
    model = _zoo_model("rslora" if rslora else "lora", r=r, alpha=alpha, target_modules=["q_proj"])
    return model.base_model.model.model.layers[0].self_attn.q_proj.scaling["default"]


def _scaling_hint(r, alpha, got) -> str:
    """The mistake a wrong scale looks like, if one fits."""
    divide = "divide alpha by r (or by its square root with rsLoRA), not r by alpha."
    for wrong, text in (
        (alpha / r, "with rslora=True the scale divides alpha by the square root of r, not by r."),
        (alpha / math.sqrt(r), "with rslora=False the scale is plain LoRA's: alpha divided by r."),
        (alpha // r, "use / not //: the scale need not be a whole number."),
        (alpha // math.sqrt(r), "use / not //: the scale need not be a whole number."),
        (alpha / r**2, "rsLoRA divides by the square root of r, not by its square."),
        (r / alpha, divide),
        (math.sqrt(r) / alpha, divide),
        (math.sqrt(alpha / r), "rsLoRA takes the square root of r alone, not of alpha / r."),
        (alpha, "alpha alone is not the scale: divide it by r (or by its square root)."),
    ):
        if isclose(got, wrong, rel_tol=1e-9):
            return text
    return "LoRA divides alpha by r, rsLoRA divides it by the square root of r."


def _check_scaling(scaling, r, alpha, rslora) -> float:
    """Compare scaling with PEFT's (lora.lora_scaling refused); explain a mismatch."""
    with mock.patch.object(lora, "lora_scaling", _refuse_lora_scaling):
        got = scaling(r, alpha, rslora=rslora)
    expected = _peft_scaling(r, alpha, rslora)
    expect(
        isclose(expected, _course_scaling(r, alpha, use_rslora=rslora), rel_tol=1e-12),
        f"PEFT scales by {expected!r} with r={r}, alpha={alpha}, rslora={rslora}, but "
        "course_utils.lora.lora_scaling does not. Hint: this is the course's fault, not your "
        "answer's: please report it.",
    )
    expect(
        isinstance(got, int | float) and not isinstance(got, bool),
        f"scaling returned {type(got).__name__}. Hint: return a number (a float).",
    )
    expect(
        isclose(got, expected, rel_tol=1e-9),
        f"scaling(r={r}, alpha={alpha}, rslora={rslora}) is {got!r}, but PEFT scales by "
        f"{expected!r}. Hint: {_scaling_hint(r, alpha, got)}",
    )
    return got


#: (r, alpha, rslora) of the visible test.
SCALING_CASES = [(8, 16, False), (32, 16, False), (16, 16, True)]


def _size_table(scaling) -> str:
    """The size of s * B @ A @ x for random factors, LoRA against rsLoRA, rank 1 to 256."""
    # Random factors whose r rank-1 terms each have length about 1, 64 random inputs x.
    g = torch.Generator().manual_seed(0)
    X = torch.randn(64, 1024, generator=g)
    lines = ["rank r | |B A x| | |s B A x|, LoRA (alpha=16) | rsLoRA (alpha=16)"]
    for r in (1, 4, 16, 64, 256):
        A = torch.randn(r, 1024, generator=g) / 32
        B = torch.randn(1024, r, generator=g) / 32
        size = float((X @ A.T @ B.T).norm(dim=1).pow(2).mean().sqrt())
        plain, rs = scaling(r, 16) * size, scaling(r, 16, rslora=True) * size
        lines.append(f"{r:6d} | {size:7.2f} | {plain:26.2f} | {rs:6.2f}")
    return "\n".join(lines)


@exercise(1, "scaling")
def scaling(scaling, cases=SCALING_CASES) -> str:
    """Exercise 1: scaling(r, alpha, rslora) against the scale PEFT stores in its LoRA layers.

    Reports the size of the update s B A x at ranks 1 to 256 with both scales.
    """
    for r, alpha, rslora in cases:
        _check_scaling(scaling, r, alpha, rslora)
    return _size_table(scaling)


# Exercise 2: what each method trains.

#: Where each projection sits in a decoder layer.
PROJECTIONS = {
    "q_proj": "self_attn.q_proj",
    "k_proj": "self_attn.k_proj",
    "v_proj": "self_attn.v_proj",
    "o_proj": "self_attn.o_proj",
    "gate_proj": "mlp.gate_proj",
    "up_proj": "mlp.up_proj",
    "down_proj": "mlp.down_proj",
}
#: The methods that train LoRA's two factors and nothing else.
LORA_FAMILY = ("lora", "rslora", "lora+", "pissa", "delta-lora")


def _refuse_formula(*args, **kwargs):
    raise Wrong(
        "trainable_params called methods.trainable_parameter_formula. Hint: add up "
        "trainable_per_layer over memory.linear_layer_shapes yourself."
    )


def _layer_hint(method, d_in, d_out, r, got) -> str:
    """Why a per-layer count differs from PEFT's."""
    lora_factors = r * (d_in + d_out)
    for wrong, which, hint in (
        (lora_factors, ("dora",), "DoRA also trains the magnitude m: one number per output "
         "feature (d_out)."),
        (lora_factors, ("vera",), "VeRA's A and B are frozen and shared: only the vectors d (r) "
         "and b (d_out) train."),
        (lora_factors, ("lora-fa",), "LoRA-FA freezes A (r x d_in): only B (d_out x r) trains."),
        (lora_factors + d_in, ("dora",), "the magnitude has one entry per row of W: d_out, not "
         "d_in."),
        (lora_factors + d_out, LORA_FAMILY, f"only DoRA adds a magnitude; {method} trains A "
         "and B."),
        (r * d_in, ("lora-fa",), "A (r x d_in) is the frozen one; B (d_out x r) trains."),
        (r + d_in, ("vera",), "b scales the outputs: it has d_out entries, not d_in."),
        (d_in + d_out, ("vera",), "d has r entries (one per row of A) and b has d_out."),
        (d_out, ("vera",), "VeRA trains d (r numbers) as well as b (d_out)."),
    ):  # fmt: skip
        if got == wrong and method in which:
            return hint
    if method in LORA_FAMILY:
        return (
            f"{method} trains both of LoRA's factors, A (r x d_in) and B (d_out x r), "
            "and nothing else."
        )
    return "count what the method trains: see the list above."


def _check_layer(trainable_per_layer, method, name, r, overrides) -> int:
    """Compare trainable_per_layer with what PEFT trains on projection `name` of layer 0."""
    shape = dict(overrides)
    seed = shape.pop("seed", 0)
    d_in, d_out = memory.linear_layer_shapes({**TINY, **shape})[name]
    model = _zoo_model(method, r=r, target_modules=[name], seed=seed, **shape)
    prefix = f"layers.0.{PROJECTIONS[name]}."
    expected = sum(
        p.numel() for n, p in model.named_parameters() if prefix in n and p.requires_grad
    )
    got = trainable_per_layer(method, d_in, d_out, r)
    expect(
        isinstance(got, int) and not isinstance(got, bool),
        f"trainable_per_layer returned {type(got).__name__}. Hint: a count is an int.",
    )
    expect(
        got == expected,
        f"trainable_per_layer({method!r}, d_in={d_in}, d_out={d_out}, r={r}) is {got:,}, "
        f"but {method} trains {expected:,} numbers on {name}. "
        f"Hint: {_layer_hint(method, d_in, d_out, r, got)}",
    )
    return got


def _check_model(trainable_per_layer, trainable_params, config, method, r, targets, build):
    """Compare trainable_params with methods.trainable_parameter_formula (and PEFT if `build`)."""
    with mock.patch.object(methods, "trainable_parameter_formula", _refuse_formula):
        got = trainable_params(config, method, r=r, targets=targets)
    expected = methods.trainable_parameter_formula(config, method, r=r, targets=targets)
    if build:  # config is a dict: PEFT on the model it describes
        model = methods.apply_method(
            LlamaForCausalLM(LlamaConfig(**config)),
            method,
            r=r,
            target_modules=targets,
            verbose=False,
        )
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        expect(
            trainable == expected,
            f"PEFT trains {trainable:,} numbers for {method}, r={r}, targets={targets!r}, but "
            f"the course's formula says {expected:,}. Hint: this is the course's fault, not "
            "your answer's: please report it.",
        )
    if got == expected:
        return got
    layers = memory.get_config(config)["num_hidden_layers"]
    names = memory.LLAMA_LINEAR_LAYERS if targets == "all-linear" else targets
    swapped = layers * sum(
        trainable_per_layer(method, d_out, d_in, r)
        for name, (d_in, d_out) in memory.linear_layer_shapes(config).items()
        if name in names
    )
    all_seven = methods.trainable_parameter_formula(config, method, r=r)
    if got * layers == expected:
        hint = "every decoder layer has the targets: multiply by num_hidden_layers."
    elif got == swapped:
        hint = "linear_layer_shapes gives (d_in, d_out), in that order."
    elif got == all_seven:
        hint = f"count only the targets {targets!r}, not all seven projections."
    else:
        hint = "add trainable_per_layer over the targets' shapes, times the number of layers."
    expect(
        False,
        f"trainable_params({str(config)[:30]!r}, {method!r}, r={r}, targets={targets!r}) is "
        f"{got:,}, expected {expected:,}. Hint: {hint}",
    )
    return got  # not reached


def _check_unknown(trainable_per_layer, name) -> None:
    """trainable_per_layer must raise ValueError for a name that is not a method of the zoo."""
    try:
        trainable_per_layer(name, 64, 64, 8)
    except ValueError:
        return
    except NotImplementedError:
        raise
    except Exception as error:  # noqa: BLE001 - any other exception is the wrong one
        expect(
            False,
            f"trainable_per_layer({name!r}, ...) raised {type(error).__name__}, not ValueError. "
            "Hint: check the name against methods.METHODS before anything else.",
        )
    expect(
        False,
        f"trainable_per_layer({name!r}, ...) must raise ValueError. "
        "Hint: a name that is not in methods.METHODS is not a method of the zoo.",
    )


#: (method, projection, r, config overrides and "seed") of the visible test: k_proj has 64 inputs
#: and 32 outputs (grouped-query attention), gate_proj 64 inputs and 128 outputs.
LAYER_CASES = [
    (method, name, r, {})
    for method in ("lora", "dora", "vera", "lora-fa")
    for name, r in (("k_proj", 4), ("gate_proj", 8))
]
#: (config, method, r, targets, build the model with PEFT too) of the visible test.
MODEL_CASES = [
    (TINY, "dora", 8, "all-linear", True),
    (TINY, "vera", 8, ["q_proj", "v_proj"], True),
    ("SmolLM2-135M", "lora-fa", 16, "all-linear", False),
]


def _zoo_table(trainable_params) -> str:
    """What each method trains on SmolLM2 at r=16 on all linear layers."""
    plain = trainable_params("SmolLM2-135M", "lora")
    lines = ["SmolLM2-135M, r=16 on all linear layers:"]
    for method in methods.METHODS:
        n = trainable_params("SmolLM2-135M", method)
        share = n / memory.count_params("SmolLM2-135M")
        lines.append(
            f"  {method:10s} {n:>10,} trainable ({n / plain:6.1%} of LoRA's, "
            f"{share:.3%} of the model)"
        )
    return "\n".join(lines)


@exercise(2, "trainable_per_layer", "trainable_params")
def trainable_params(
    trainable_per_layer, trainable_params, cases=LAYER_CASES, models=MODEL_CASES, unknown=()
) -> str:
    """Exercise 2: the numbers each method trains, per projection (`cases`) and in a model.

    `cases` are (method, projection, r, overrides) compared with what PEFT trains on that
    projection of a tiny Llama (the overrides change its config, "seed" its weights); `models`
    are (config, method, r, targets, build) compared with methods.trainable_parameter_formula
    (and with PEFT on the model of `config` when `build`); `unknown` are names for which
    trainable_per_layer must raise ValueError.
    """
    for method, name, r, overrides in cases:
        _check_layer(trainable_per_layer, method, name, r, overrides)
    for config, method, r, targets, build in models:
        _check_model(trainable_per_layer, trainable_params, config, method, r, targets, build)
    for name in unknown:
        _check_unknown(trainable_per_layer, name)
    return _zoo_table(trainable_params)


# Exercise 3: inside a DoRA layer.


def _dora_model(r=8, alpha=16, seed=0, **overrides):
    """The notebook's dora_model: DoRA on all linear layers, B and m moved as after training."""
    model = _zoo_model("dora", r=r, alpha=alpha, seed=seed, **overrides)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:  # a fresh adapter has B = 0; after training it does not
                param.copy_(torch.randn(param.shape, generator=g) * 0.05)
            elif "lora_magnitude_vector" in name:
                param.mul_(1 + 0.2 * torch.randn(param.shape, generator=g))
    return model


def _parts(layer):
    """W, A, B, m, s and the bias of a DoRA layer."""
    return (
        layer.base_layer.weight,
        layer.lora_A["default"].weight,
        layer.lora_B["default"].weight,
        layer.lora_magnitude_vector["default"].weight,
        layer.scaling["default"],
        layer.base_layer.bias,
    )


def _detached_parts(layer):
    """_parts(layer), the tensors detached."""
    return tuple(t.detach() if torch.is_tensor(t) else t for t in _parts(layer))


def _wrong_weights(layer):
    """Typical mistakes, each with its hint (those that fit the layer's shapes)."""
    W, A, B, m, s, _ = _detached_parts(layer)
    V = W + s * B @ A
    rows = torch.linalg.norm(V, dim=1, keepdim=True)
    mistakes = (
        (lambda: V, "the direction is not scaled to the magnitude m, nor divided by its norms."),
        (lambda: V / rows, "the unit rows are not scaled by the magnitude m."),
        (lambda: m[:, None] * V, "the rows are not divided by their norms before m scales them."),
        (lambda: m[:, None] * V / torch.linalg.norm(W, dim=1, keepdim=True),
         "the norm is of the adapted weight, with the update added, not of W alone."),
        (lambda: m[:, None] * V / torch.linalg.norm(V), "one norm per output feature (row), "
         "dim=1, not one norm of the whole matrix."),
        (lambda: m[:, None] * V / torch.linalg.norm(V, dim=0, keepdim=True),
         "the norm is per row (output feature, dim=1), not per column."),
        (lambda: m[None, :] * V / torch.linalg.norm(V, dim=0, keepdim=True),
         "m and the norms belong to the rows (output features): use dim=1 and m[:, None]."),
        (lambda: (W + B @ A) * m[:, None] / torch.linalg.norm(W + B @ A, dim=1, keepdim=True),
         "the update B @ A is not scaled: multiply it by s, the layer's scaling['default']."),
    )  # fmt: skip
    for make, hint in mistakes:
        try:
            yield make(), hint
        except RuntimeError:  # this mistake does not fit a non-square layer
            pass


def _row_scale(layer):
    """m / ||W + s B A||, row by row."""
    W, A, B, m, s, _ = _detached_parts(layer)
    return m / torch.linalg.norm(W + s * B @ A, dim=1)


def _call(function, *args):
    """Run the learner's function; a shape error becomes a failed test with a hint."""
    try:
        return function(*args)
    except NotImplementedError:  # a RuntimeError too: not answered yet
        raise
    except RuntimeError as error:
        message = str(error).strip().splitlines()[0] if str(error).strip() else ""
        raise Wrong(
            f"{function.__name__} failed: {message}. Hint: W and B @ A are d_out x d_in; m and "
            "the row norms have d_out entries: divide row by row with [:, None]."
        ) from error


def _check_weight(dora_weight, layer):
    """Compare dora_weight with the weight of PEFT's merge of a copy of the layer."""
    W, A, B, m, *_ = _parts(layer)
    before = [t.detach().clone() for t in (W, A, B, m)]
    got = _call(dora_weight, layer)
    expect(
        isinstance(got, torch.Tensor),
        f"dora_weight returned {type(got).__name__}. Hint: return the d_out x d_in tensor W'.",
    )
    expect(
        all(equal(t, b) for t, b in zip((W, A, B, m), before, strict=True)),
        "dora_weight changed the layer. Hint: build a new tensor (W + ...), never W += ....",
    )
    merged = copy.deepcopy(layer)
    merged.merge()
    expected = merged.base_layer.weight.detach()
    expect(
        tuple(got.shape) == tuple(expected.shape),
        f"W' has shape {tuple(got.shape)}, expected {tuple(expected.shape)} (d_out x d_in). "
        "Hint: m has one entry per row: m[:, None].",
    )
    got = got.detach()
    if allclose(got, expected, rtol=1e-5, atol=1e-6):
        return got
    hint = "W' is m times the unit rows of the adapted weight W + s·B·A, one norm per row."
    for wrong, text in _wrong_weights(layer):
        if wrong.shape == got.shape and allclose(got, wrong, rtol=1e-5, atol=1e-6):
            hint = text
            break
    expect(
        False,
        f"dora_weight differs from PEFT's merged weight by up to "
        f"{float((got - expected).abs().max()):.3g}. Hint: {hint}",
    )
    return got  # not reached


def _refuse(*args, **kwargs):
    raise Wrong(
        "dora_forward called the layer. Hint: compute h from the layer's tensors "
        "and your dora_weight, without calling the layer or its base layer."
    )


def _grads(layer, x, forward):
    """The output of `forward` and the gradients of a fixed loss for A, B and m."""
    _, A, B, m, *_ = _parts(layer)
    for t in (A, B, m):
        t.grad = None
    out = forward(x)
    if not (isinstance(out, torch.Tensor) and out.requires_grad):
        return out, None
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    (out * g).sum().backward()
    grads = [None if t.grad is None else t.grad.clone() for t in (A, B, m)]
    for t in (A, B, m):
        t.grad = None
    return out.detach(), grads


def _forward_hint(dora_weight, layer, x, got) -> str:
    """Why dora_forward's output differs from the layer's."""
    bias = layer.base_layer.bias
    with torch.no_grad():
        merged = dora_weight(layer).detach()
    if bias is not None and allclose(got, x @ merged.T, rtol=1e-4, atol=1e-5):
        return "the base layer's bias is missing: layer.base_layer.bias."
    if bias is not None and allclose(
        got, x @ merged.T + bias * _row_scale(layer), rtol=1e-4, atol=1e-5
    ):
        return "add the bias after the DoRA weight: m / ||V|| scales x Vᵀ, not the bias."
    return "multiply x by the transpose of your W', then add the base layer's bias if it has one."


def _check_forward(dora_weight, dora_forward, layer, shape, seed=0) -> float:
    """Compare dora_weight, dora_forward and its gradients with the layer's own; explain."""
    expect(
        layer.training,
        "the tests run DoRA layers in training mode. "
        "Hint: call layer.train() (or rerun the cells above) before the test.",
    )
    _check_weight(dora_weight, layer)
    x = torch.randn(*shape, layer.in_features, generator=torch.Generator().manual_seed(seed))
    expected, expected_grads = _grads(layer, x, layer)
    magnitude = layer.lora_magnitude_vector["default"]
    with (
        mock.patch.object(layer, "forward", _refuse),
        mock.patch.object(layer.base_layer, "forward", _refuse),
        mock.patch.object(magnitude, "forward", _refuse),
    ):
        got, got_grads = _grads(layer, x, lambda x: _call(dora_forward, layer, x))
    expect(
        isinstance(got, torch.Tensor) and tuple(got.shape) == tuple(expected.shape),
        f"dora_forward must return a tensor of shape {tuple(expected.shape)} for x of shape "
        f"{tuple(x.shape)}. Hint: multiplying by W'.T keeps the leading dimensions of x.",
    )
    if not allclose(got, expected, rtol=1e-4, atol=1e-5):
        expect(
            False,
            f"dora_forward is off by up to {float((got - expected).abs().max()):.3g}. "
            f"Hint: {_forward_hint(dora_weight, layer, x, got)}",
        )
    expect(
        got_grads is not None and all(g is not None for g in got_grads),
        "no gradient reached A, B or m through dora_forward. Hint: compute with the layer's own "
        "tensors, without torch.no_grad() and without detaching A, B or m.",
    )
    for label, mine, theirs in zip(("A", "B", "m"), got_grads, expected_grads, strict=True):
        # fp32 rounding differs with the order of the sums: compare to the gradient's size
        expect(
            allclose(mine, theirs, rtol=1e-4, atol=1e-5 * float(theirs.abs().max())),
            f"the gradient of {label} differs from PEFT's by up to "
            f"{float((mine - theirs).abs().max()):.3g}. Hint: the row norms get no gradient in "
            "DoRA: treat them as a constant (detached), as the DoRA paper and PEFT do.",
        )
    return float((got - expected).abs().max())


def _visible_layer():
    """The layer of the visible test: k_proj of the first layer of the notebook's dora_model()."""
    return _dora_model().base_model.model.model.layers[0].self_attn.k_proj


def _dora_report(dora_weight, dora_forward, layer) -> str:
    """How close the output is to PEFT's, the row lengths of W', and how far W' is from LoRA's."""
    error = _check_forward(dora_weight, dora_forward, layer, (3,))
    with torch.no_grad():
        W, A, B, m, s, _ = _parts(layer)
        plain = W + s * B @ A
        dora = dora_weight(layer)
    return (
        f"DoRA's output matches PEFT's up to {error:.1e}, gradients too\n"
        f"row lengths of W' = m exactly: {allclose(dora.norm(dim=1), m)}\n"
        f"DoRA's W' differs from LoRA's W + s·B·A by "
        f"{float((dora - plain).norm() / plain.norm()):.0%}"
    )


@exercise(3, "dora_weight", "dora_forward")
def dora_forward(dora_weight, dora_forward, cases=None) -> str | None:
    """Exercise 3: dora_weight against PEFT's merge, dora_forward and its gradients against PEFT.

    `cases` is a list of (PEFT DoRA layer in training mode, leading shape of x, seed of x);
    without it, the visible test on k_proj of the notebook's dora_model(), and a report.
    """
    if cases is not None:
        for layer, shape, seed in cases:
            _check_forward(dora_weight, dora_forward, layer, shape, seed)
        return None
    layer = _visible_layer()
    _check_forward(dora_weight, dora_forward, layer, (2, 5))
    return _dora_report(dora_weight, dora_forward, layer)
