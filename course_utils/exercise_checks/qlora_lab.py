"""Checks for the exercises of lesson 06 (QLoRA lab): NF4 bytes, the method that fits, a QLoRA layer, a 4-bit config.

The checks compare the learner's answers with bitsandbytes itself (real 4-bit layers and their
``quant_state``), the course's memory estimator (`course_utils.memory`) and lesson 03's
dequantization (`course_utils.quant`).
"""

from __future__ import annotations

import math
from unittest import mock

import torch
from bitsandbytes.functional import dequantize_4bit
from bitsandbytes.nn import Linear4bit, Params4bit
from transformers import BitsAndBytesConfig

from course_utils.exercise_checks.feedback import allclose, equal, exercise, expect, isclose
from course_utils.memory import (
    GB,
    GPUS,
    LLAMA_LINEAR_LAYERS,
    estimate,
    fits,
    measure_model_bytes,
)
from course_utils.quant import double_dequantize_absmax, double_quant_bits_per_param, nf4_dequantize

#: The methods of exercise 2, in order of preference (the notebook's METHODS).
METHODS = ("full", "lora", "qlora")


# Exercise 1: the bytes of an NF4 weight.


def _check_nf4_bytes(nf4_weight_bytes, linear4bit, d_out, d_in, double_quant) -> int:
    """Compare nf4_weight_bytes with the bytes of a real Linear4bit; explain a mismatch."""
    got = nf4_weight_bytes(d_out, d_in, double_quant=double_quant)
    expect(
        isinstance(got, int) and not isinstance(got, bool),
        f"nf4_weight_bytes returned {type(got).__name__}, not an int. "
        "Hint: bytes are whole numbers: round each part up and keep to integer arithmetic.",
    )
    expected = measure_model_bytes(linear4bit(d_out, d_in, double_quant=double_quant))
    if got == expected:
        return got
    n, diff = d_out * d_in, expected - got
    blocks = math.ceil(n / 64)
    if diff in (64, 64 + 1024, 1024):
        hint = (
            "a code book is missing: NF4's 16 values (and, with double quantization, the 256 "
            "values of the 8-bit absmax map) are kept in fp32 too."
        )
    elif double_quant and diff == 4:
        hint = "the 4-byte fp32 offset of double quantization is missing."
    elif double_quant and got - expected == 3 * blocks - 4 * math.ceil(blocks / 256) - 1028:
        hint = (
            "that is the size without double quantization: with it the absmax values take one "
            "byte each, plus their own scales, offset and map."
        )
    elif n % 2 and diff == 1:
        hint = f"n = {n} is odd: the last byte holds a single 4-bit code and still counts."
    elif diff == -(n // 2):
        hint = "a 4-bit code is half a byte: you counted a whole byte per value."
    else:
        hint = (
            "add up every part listed above: the codes, the absmax values (with double "
            "quantization: their scales and offset too) and the code books."
        )
    expect(
        False,
        f"nf4_weight_bytes({d_out}, {d_in}, double_quant={double_quant}) is {got:,}, but "
        f"bitsandbytes keeps {expected:,} bytes (off by {diff:+,}). Hint: {hint}",
    )


def _nf4_report(nf4_weight_bytes) -> str:
    """The bytes and bits per weight of a few shapes, and where double quantization pays."""
    lines = []
    for d_out, d_in in ((64, 96), (576, 576), (1536, 576), (4096, 4096)):
        plain, nested = (nf4_weight_bytes(d_out, d_in, double_quant=dq) for dq in (False, True))
        n = d_out * d_in
        lines.append(
            f"{d_out:>4} x {d_in:<4}: fp32 {4 * n:>10,} B, NF4 {plain:>9,} B "
            f"({8 * plain / n:.3f} bits/weight), + double quant {nested:>9,} B ({8 * nested / n:.3f})"
        )
    lines.append(
        f"lesson 03's bits per weight, tables left out: {double_quant_bits_per_param():.3f}"
    )
    even = next(
        (n for n in range(64, 10**6, 64) if nf4_weight_bytes(1, n) < nf4_weight_bytes(1, n, False)),
        None,
    )
    if even is not None:
        lines.append(f"double quantization saves memory from {even:,} values per matrix on")
    return "\n".join(lines)


#: (d_out, d_in, double_quant) of the visible tests.
NF4_CASES = [(64, 96, False), (64, 96, True), (576, 576, True)]


@exercise(1, "nf4_weight_bytes")
def nf4_weight_bytes(nf4_weight_bytes, linear4bit, cases=NF4_CASES, pays=()) -> str | None:
    """Exercise 1: nf4_weight_bytes against the bytes of real bitsandbytes layers.

    `linear4bit` is the notebook's maker of NF4 layers; `pays` is a list of ((d_out, d_in),
    whether double quantization saves memory for that shape).
    """
    for d_out, d_in, double_quant in cases:
        _check_nf4_bytes(nf4_weight_bytes, linear4bit, d_out, d_in, double_quant)
    for (d_out, d_in), saves in pays:
        nested = nf4_weight_bytes(d_out, d_in, True)
        plain = nf4_weight_bytes(d_out, d_in, False)
        expect(
            (nested < plain) == saves,
            f"for a {d_out} x {d_in} weight you count {nested:,} bytes with double quantization "
            f"and {plain:,} without, but double quantization {'saves' if saves else 'costs'} "
            "memory there. Hint: its 1 KB map costs more than it saves on a small matrix, and "
            "far less than it saves on a large one.",
        )
    return _nf4_report(nf4_weight_bytes) if cases is NF4_CASES else None


# Exercise 2: which method fits the GPU.


def _estimate(config, method, dtype, batch, seq_len, r, **changes):
    """The estimator's MemoryEstimate for one recipe (changes: to recognise a mistake)."""
    options = {"master_weights": dtype != "fp32"} if method == "full" else {"lora_r": r}
    if method == "qlora":
        options["gradient_checkpointing"] = True
    options.update(changes)
    return estimate(config, method=method, dtype=dtype, batch=batch, seq_len=seq_len, **options)


def _check_gb(training_gb, config, method, dtype="bf16", batch=1, seq_len=512, r=16):
    """Compare training_gb with memory.estimate; explain a mismatch. None for an unknown method."""
    if method not in METHODS:
        try:
            got = training_gb(config, method, dtype=dtype, batch=batch, seq_len=seq_len, r=r)
        except ValueError:
            return None
        expect(
            False,
            f"training_gb(config, {method!r}) returned {got!r}, but {method!r} is not one of "
            f"{METHODS}. Hint: raise a ValueError for a method the exercise does not know.",
        )
    got = training_gb(config, method, dtype=dtype, batch=batch, seq_len=seq_len, r=r)
    expect(
        isinstance(got, int | float) and not isinstance(got, bool),
        f"training_gb returned {type(got).__name__}, not a number. Hint: return the GB as a float.",
    )
    expected = _estimate(config, method, dtype, batch, seq_len, r)
    if isclose(float(got), expected.total / GB, rel_tol=1e-9):
        return got
    wrong = {
        "QLoRA's estimate is without gradient checkpointing, which "
        "prepare_model_for_kbit_training turns on.": (
            method == "qlora"
            and _estimate(
                config, method, dtype, batch, seq_len, r, gradient_checkpointing=False
            ).total
        ),
        "in bf16/fp16 full fine-tuning is mixed precision: the estimate lacks the fp32 master "
        "copy of the weights.": (
            method == "full"
            and _estimate(config, method, dtype, batch, seq_len, r, master_weights=False).total
        ),
        "the estimate ignores batch and seq_len, and the activations grow with them.": estimate(
            config, method=method, dtype=dtype
        ).total,
        "the adapters have the estimator's default rank, not r.": (
            method != "full"
            and _estimate(config, method, dtype, batch, seq_len, r, lora_r=16).total
        ),
        "a GB here is 2**30 bytes, not 10**9.": expected.total * GB / 1e9,
        "that is a number of bytes, not of GB.": expected.total * GB,
        "that is the weights alone, not the estimate's total.": expected.weights,
    }
    hint = (
        "the estimate differs from the recipe of that method: check every option it sets "
        "(see the list above) and that the answer is in GB."
    )
    for text, value in wrong.items():
        if value and isclose(float(got), value / GB, rel_tol=1e-9):
            hint = text
            break
    expect(
        False,
        f"training_gb({config!r:.30}, {method!r}, {dtype!r}, batch={batch}, seq_len={seq_len}, "
        f"r={r}) is {float(got):.4g} GB, expected {expected.total / GB:.4g} GB. Hint: {hint}",
    )


def _check_pick(training_gb, pick_method, config, gpu_gb, dtype="bf16", batch=1, seq_len=512, r=16):
    """Compare pick_method with memory.fits on the estimator's numbers; explain a mismatch."""
    sizes = {m: _check_gb(training_gb, config, m, dtype, batch, seq_len, r) for m in METHODS}
    fitting = [m for m in METHODS if fits(_estimate(config, m, dtype, batch, seq_len, r), gpu_gb)]
    expected = fitting[0] if fitting else None
    got = pick_method(config, gpu_gb, dtype=dtype, batch=batch, seq_len=seq_len, r=r)
    if got == expected:
        return got
    if got is not None and got not in METHODS:
        hint = f"return one of {METHODS} or None."
    elif got in METHODS and gpu_gb >= sizes[got] > 0.9 * gpu_gb:
        hint = (
            f"{got!r} needs {sizes[got]:.2f} GB: within {gpu_gb} GB, but above 90 % of it. "
            "Keep 10 % back."
        )
    elif got in fitting:
        hint = f"{expected!r} fits too and comes first in METHODS, the order of preference."
    elif expected is None:
        hint = "no method fits: say so with None."
    else:
        hint = f"{got!r} needs {sizes[got]:.2f} GB, more than 90 % of {gpu_gb} GB."
    expect(
        False,
        f"pick_method({config!r:.30}, {gpu_gb} GB, ...) is {got!r}, expected {expected!r} "
        f"(estimates: { {m: round(gb, 2) for m, gb in sizes.items()} }). Hint: {hint}",
    )


#: (config, method or GPU GB, options): a method checks training_gb, GB check pick_method.
PICK_CASES = [
    ("SmolLM2-135M", "full", {"dtype": "fp32", "batch": 8, "seq_len": 160}),
    ("Llama-2-7B", "qlora", {}),
    ("Llama-2-7B", 16, {}),
    ("Llama-2-7B", 40, {}),
    ("Llama-3.2-1B", 24, {}),
    ("Llama-3-70B", 24, {}),
]


@exercise(2, "training_gb", "pick_method")
def pick_method(training_gb, pick_method, cases=PICK_CASES) -> str | None:
    """Exercise 2: training_gb against memory.estimate, pick_method against memory.fits.

    A case (config, method, options) checks training_gb (a method not in METHODS must raise a
    ValueError); a case (config, gpu_gb, options) checks pick_method and the three estimates.
    """
    for config, what, options in cases:
        if isinstance(what, str):
            _check_gb(training_gb, config, what, **options)
        else:
            _check_pick(training_gb, pick_method, config, what, **options)
    if cases is not PICK_CASES:
        return None
    lines = []
    for model in ("Llama-3.2-1B", "Llama-2-7B", "Llama-3-70B"):
        sizes = {m: f"{training_gb(model, m):.1f}" for m in METHODS}
        picks = {gpu: pick_method(model, gb) for gpu, gb in GPUS.items()}
        lines.append(f"{model} (bf16, batch 1 x 512 tokens), GB {sizes}:\n  {picks}")
    return "\n".join(lines)


# Exercise 3: inside a QLoRA layer.


def _course_dequantize(layer) -> torch.Tensor:
    """The weight decoded step by step with lesson 03's functions (course_utils.quant)."""
    weight = getattr(layer, "base_layer", layer).weight
    state = weight.quant_state
    absmax = state.absmax
    if state.nested:
        absmax = double_dequantize_absmax(state.absmax, state.state2.absmax, state.offset)
    return nf4_dequantize(weight.data, absmax, shape=tuple(state.shape))


def _check_dequantize(dequantize, layer) -> torch.Tensor:
    """Compare dequantize with bitsandbytes and course_utils.quant; explain a mismatch."""
    weight = getattr(layer, "base_layer", layer).weight
    codes = weight.data.clone()
    expected = dequantize_4bit(weight.data, weight.quant_state).float()
    expect(
        equal(expected, _course_dequantize(layer)),
        "bitsandbytes and course_utils.quant decode this weight differently, which is not your "
        "answer's fault. Hint: run the set-up cell again; if it persists, tell the course.",
    )
    with torch.no_grad():
        got = dequantize(layer)
    expect(
        isinstance(got, torch.Tensor),
        f"dequantize returned {type(got).__name__}. Hint: return the decoded weight tensor.",
    )
    expect(equal(weight.data, codes), "dequantize changed the 4-bit codes. Hint: only read them.")
    expect(
        tuple(got.shape) == tuple(expected.shape),
        f"the weight has shape {tuple(got.shape)}, expected {tuple(expected.shape)}. Hint: the "
        "4-bit tensor is flat; quant_state.shape is the shape of the weight it stands for.",
    )
    expect(got.dtype == torch.float32, f"the weight is {got.dtype}. Hint: return it in fp32.")
    if not allclose(got, expected, rtol=0, atol=1e-6):
        hint = "decode the codes with everything their quant_state holds (absmax, code book)."
        if weight.quant_state.nested:
            hint += " Here the absmax values are 8-bit themselves (nested): decode them first."
        expect(
            False,
            f"the dequantized weight is off by up to {float((got - expected).abs().max()):.3g}. "
            f"Hint: {hint}",
        )
    return got


def _refuse(*args, **kwargs):
    """Stands for the layer's forward while qlora_forward runs: it must not be called."""
    expect(
        False,
        "qlora_forward called the layer. Hint: compute h from dequantize(layer), the bias and "
        "the adapter's tensors, without running the layer or its base layer.",
    )


def _check_forward(dequantize, qlora_forward, layer, shape, seed=0) -> float:
    """Compare qlora_forward with the layer's own output on a random input; explain a mismatch."""
    expect(
        layer.training,
        "the QLoRA layer is in eval mode, and the tests run it in training mode. "
        "Hint: call model.train() or run the cell that builds the model again.",
    )
    x = torch.randn(*shape, layer.in_features, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        expected = layer(x)
        with (
            mock.patch.object(type(layer), "forward", _refuse),
            mock.patch.object(Linear4bit, "forward", _refuse),
        ):
            got = qlora_forward(layer, x)
        W = _check_dequantize(dequantize, layer)
        A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        s = layer.scaling["default"]
        bias = 0 if layer.base_layer.bias is None else layer.base_layer.bias
    expect(
        isinstance(got, torch.Tensor) and tuple(got.shape) == tuple(expected.shape),
        f"qlora_forward must return a tensor of shape {tuple(expected.shape)} for x of shape "
        f"{tuple(x.shape)}. Hint: the product with the weight keeps the leading dimensions of x.",
    )
    if allclose(got, expected, rtol=1e-4, atol=1e-5):
        return float((got - expected).abs().max())
    update = (x @ A.T) @ B.T
    hint = (
        "compare each term with the layer's: the 4-bit weight decoded, the bias, then the "
        "adapter's update and its scale."
    )
    for wrong, text in (
        (x @ W.T + bias, "the adapter's update is missing: that is the base layer's output alone."),
        (x @ W.T + bias + update, "the adapter's update is not scaled by the layer's scaling."),
        (x @ W.T + s * update, "the base layer's bias is missing."),
    ):
        if allclose(got, wrong, rtol=1e-4, atol=1e-5):
            hint = text
            break
    expect(
        False,
        f"qlora_forward is off by up to {float((got - expected).abs().max()):.3g}. Hint: {hint}",
    )


@exercise(3, "dequantize", "qlora_forward")
def qlora_forward(dequantize, qlora_forward, linear4bit, layer, cases=None) -> str | None:
    """Exercise 3: dequantize against bitsandbytes, qlora_forward against the layer itself.

    `linear4bit` and `layer` are the notebook's maker of NF4 layers and its QLoRA layer, for the
    visible tests. `cases` is a list of (layer, leading dimensions of x or None, seed): None
    checks dequantize alone (a bare Linear4bit), a shape checks both functions on a PEFT layer.
    """
    visible = cases is None
    if visible:
        cases = [(linear4bit(96, 64), None, 0), (layer, None, 0), (layer, (2, 5), 0)]
    for module, shape, seed in cases:
        if shape is None:
            _check_dequantize(dequantize, module)
        else:
            _check_forward(dequantize, qlora_forward, module, shape, seed)
    if not visible:
        return None
    error = _check_forward(dequantize, qlora_forward, layer, (3,))
    x = torch.randn(3, layer.in_features, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        base, full = x @ dequantize(layer).T, qlora_forward(layer, x)
    share = float((full - base).norm() / full.norm())
    return (
        f"4-bit base + adapter = the layer's output, up to {error:.1e}\n"
        f"the adapter's share of the output: {share:.0%}"
    )


# Exercise 4: the BitsAndBytesConfig of a described set-up.


def _check_bnb(
    bnb_config, save_tiny_llama, load_4bit, quant_type, double_quant, compute_dtype, keep, shape
):
    """Load a tiny Llama with bnb_config(...) and check every linear layer; explain a mismatch."""
    recipe = bnb_config(quant_type, double_quant, compute_dtype, keep=keep)
    expect(
        isinstance(recipe, BitsAndBytesConfig),
        f"bnb_config returned {type(recipe).__name__}, not transformers' quantization config. "
        f"Hint: from_pretrained takes a {BitsAndBytesConfig.__name__} as quantization_config.",
    )
    expect(
        recipe.load_in_4bit and not recipe.load_in_8bit,
        f"the config loads in {'8 bits' if recipe.load_in_8bit else 'full precision'}. "
        "Hint: this set-up stores the weights in 4 bits.",
    )
    model = load_4bit(save_tiny_llama(**shape), recipe)
    checked = 0
    for name, module in model.named_modules():
        if not (name.startswith("model.layers.") and isinstance(module, torch.nn.Linear)):
            continue
        kind = name.rsplit(".", 1)[-1]
        expect(
            kind in LLAMA_LINEAR_LAYERS,
            f"the model has a linear layer {name} that a Llama does not have. "
            "Hint: load the tiny Llama of the set-up cell.",
        )
        if kind in keep:
            expect(
                not isinstance(module, Linear4bit),
                f"{name} was quantized, but the set-up keeps {kind} in full precision. Hint: "
                "the config's list of modules left unquantized (named for 8 bits, but used for "
                "4 bits too) decides.",
            )
            expect(
                module.weight.dtype == torch.float32,
                f"{name} holds {module.weight.dtype}. Hint: a layer kept in full precision stays "
                "in the dtype the model is loaded in.",
            )
            continue
        expect(
            isinstance(module, Linear4bit),
            f"{name} is a {type(module).__name__}, not a 4-bit layer. Hint: only the projections "
            f"named in keep={list(keep)} stay unquantized.",
        )
        state = module.weight.quant_state
        expect(
            state.quant_type == quant_type,
            f"{name}'s weight is coded in {state.quant_type}, the set-up asks for {quant_type}. "
            "Hint: the config names the 4-bit code; bitsandbytes' default is fp4.",
        )
        expect(
            state.nested == double_quant,
            f"{name}'s absmax constants are {'' if state.nested else 'not '}quantized in turn "
            f"(quant_state.nested is {state.nested}), the set-up says double_quant={double_quant}. "
            "Hint: the config's double-quantization option decides it; it is off by default.",
        )
        expect(
            module.compute_dtype == compute_dtype,
            f"{name} computes in {module.compute_dtype}, the set-up in {compute_dtype}. "
            "Hint: the config's compute dtype is the dtype each weight is dequantized to for "
            "its product.",
        )
        checked += 1
    expect(
        checked,
        "no decoder layer was loaded in 4 bits. Hint: only the projections named in keep stay "
        "in full precision.",
    )
    head = model.get_output_embeddings()
    expect(
        not isinstance(head, Linear4bit) and not isinstance(head.weight, Params4bit),
        "the LM head was turned into a 4-bit layer. Hint: a list of modules to keep of your own "
        "replaces transformers' default one, which holds the LM head.",
    )
    return model


#: (quant_type, double_quant, compute_dtype, keep, changes to the tiny Llama) of the visible tests.
BNB_CASES = [
    ("nf4", True, torch.float32, (), {}),
    ("fp4", False, torch.bfloat16, ["down_proj"], {}),
]


@exercise(4, "bnb_config")
def bnb_config(bnb_config, save_tiny_llama, load_4bit, cases=BNB_CASES) -> str | None:
    """Exercise 4: the layers bnb_config gives a tiny Llama that transformers loads in 4 bits.

    `save_tiny_llama` and `load_4bit` are the notebook's; a case's last item changes the tiny
    Llama (seed, tie_word_embeddings, num_hidden_layers, ...).
    """
    models = [
        _check_bnb(bnb_config, save_tiny_llama, load_4bit, *case[:4], case[4]) for case in cases
    ]
    if cases is not BNB_CASES:
        return None
    fp32 = measure_model_bytes(load_4bit(save_tiny_llama(), None))
    lines = []
    for label, model in zip(("NF4 + double quant", "FP4, down_proj kept"), models):
        size = measure_model_bytes(model)
        lines.append(f"{label:20s} {size:>9,} bytes, {size / fp32:.0%} of fp32 ({fp32:,} bytes)")
    embedding = models[0].get_input_embeddings().weight.nbytes
    lines.append(f"of which the fp32 embedding, tied to the LM head: {embedding:,} bytes")
    return "\n".join(lines)
