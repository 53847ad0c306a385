"""Checks for the exercises of lesson 01 (Why fine-tune): bytes per parameter, counts, GPU fit."""

from __future__ import annotations

from course_utils.exercise_checks.feedback import exercise, expect, isclose
from course_utils.memory import (
    BYTES_PER_DTYPE,
    GB,
    GPUS,
    OPTIMIZER_BYTES_PER_PARAM,
    PRESETS,
    estimate,
    fits,
    get_config,
)
from course_utils.memory import count_params as reference_count_params

SMOLLM2 = PRESETS["SmolLM2-135M"]
LLAMA_2_7B = PRESETS["Llama-2-7B"]
PARTS = ("weights", "gradients", "optimizer")


def _is_number(value) -> bool:
    """An int or a float, not a bool."""
    return isinstance(value, int | float) and not isinstance(value, bool)


# ------------------------------------------------------------------------------------ exercise 1


def _reference_bytes_per_param(dtype, master_weights) -> float:
    """Weights + gradients + optimizer states per parameter, from the course's estimator."""
    n = 1_000_000
    est = estimate(n, method="full", dtype=dtype, master_weights=master_weights)
    return (est.weights + est.gradients + est.optimizer) / n


def _check_bytes_per_param(bytes_per_param, case) -> None:
    """Compare bytes_per_param with the estimator for one case; explain a mismatch.

    `case` is (dtype, master_weights), (dtype,) or () for the defaults (fp32, no master copy).
    """
    dtype = case[0] if case else "fp32"
    master = case[1] if len(case) > 1 else False
    kwargs = {"master_weights": master} if len(case) > 1 else {}
    shown = [repr(dtype)] * bool(case) + [f"master_weights={master}"] * bool(kwargs)
    call = f"bytes_per_param({', '.join(shown)})"
    got = bytes_per_param(*case[:1], **kwargs)
    expect(
        _is_number(got),
        f"{call} returned {type(got).__name__}, not a number. "
        "Hint: return the total number of bytes as an int or a float.",
    )
    expected = _reference_bytes_per_param(dtype, master)
    if isclose(got, expected):
        return
    size = BYTES_PER_DTYPE[dtype]
    adam = OPTIMIZER_BYTES_PER_PARAM["adamw"]
    if not case:
        hint = "the defaults are dtype 'fp32' without a master copy: keep the stub's signature."
    elif master and dtype != "fp32" and isclose(got, expected - 4):
        hint = (
            "with master_weights=True in bf16/fp16 the optimizer also keeps an fp32 copy of "
            "each weight (4 bytes)."
        )
    elif master and dtype == "fp32" and isclose(got, expected + 4):
        hint = "in fp32 the weights already are the master copy: master_weights adds nothing."
    elif not master and isclose(got, expected + 4):
        hint = "count the fp32 master copy only when master_weights=True."
    elif isclose(got, expected - adam) or isclose(got, expected - adam / 2):
        hint = "AdamW keeps two running averages per parameter, m and v, both in fp32."
    elif isclose(got, expected - size):
        hint = f"a weight or its gradient is missing: both are stored in {dtype}."
    else:
        hint = (
            f"full fine-tuning keeps the weight and its gradient ({size} bytes each in {dtype}), "
            "AdamW's m and v in fp32, and in mixed precision an fp32 master copy."
        )
    expect(False, f"{call} is {got}, expected {expected:g}. Hint: {hint}")


def _check_invalid_dtype(bytes_per_param, bad) -> None:
    """bytes_per_param(bad) must raise ValueError."""
    try:
        got = bytes_per_param(bad)
    except ValueError:
        return
    except NotImplementedError:
        raise
    except Exception as error:
        expect(
            False,
            f"bytes_per_param({bad!r}) raised {type(error).__name__}, not ValueError. "
            "Hint: test the dtype yourself before you look it up, and raise ValueError.",
        )
    expect(
        False,
        f"bytes_per_param({bad!r}) returned {got!r} instead of raising ValueError. "
        "Hint: only 'fp32', 'bf16' and 'fp16' are valid (exactly so written); "
        "raise ValueError for anything else.",
    )


#: (dtype, master_weights) of the visible tests; () calls bytes_per_param() with its defaults.
BYTES_CASES = [("fp32", False), ("bf16", True)]


@exercise(1, "bytes_per_param")
def bytes_per_param(bytes_per_param, cases=BYTES_CASES, invalid=()) -> str:
    """Exercise 1: bytes_per_param(dtype, master_weights) against memory.estimate(method="full").

    `invalid` are dtypes for which bytes_per_param must raise ValueError.
    """
    for case in cases:
        _check_bytes_per_param(bytes_per_param, case)
    for bad in invalid:
        _check_invalid_dtype(bytes_per_param, bad)
    lines = []
    for name in ("SmolLM2-135M", "Llama-2-7B"):
        n = reference_count_params(name)
        lines.append(
            f"{name} ({n:,} parameters), full fine-tuning in fp32: "
            f"{n * bytes_per_param('fp32') / GB:.1f} GB before a single activation"
        )
    return "\n".join(lines)


# ------------------------------------------------------------------------------------ exercise 2


def _check_count(count_params, config) -> None:
    """Compare count_params with memory.count_params; explain a mismatch."""
    got = count_params(dict(config))
    expect(
        isinstance(got, int) and not isinstance(got, bool),
        f"count_params returned {type(got).__name__}, not an int. "
        "Hint: a count is a whole number: stay with integers (// divides without a float).",
    )
    expected = reference_count_params(config)
    if got == expected:
        return
    cfg = get_config(config)
    hidden, layers, vocab = cfg["hidden_size"], cfg["num_hidden_layers"], cfg["vocab_size"]
    kv_dim = cfg["num_key_value_heads"] * cfg["head_dim"]
    q_dim = cfg["num_attention_heads"] * cfg["head_dim"]
    diff = got - expected
    if diff == vocab * hidden and cfg["tie_word_embeddings"]:
        hint = "this model ties its LM head to the embedding: count that matrix once."
    elif diff == -vocab * hidden and not cfg["tie_word_embeddings"]:
        hint = "tie_word_embeddings is false here: the LM head is a matrix of its own, add it."
    elif diff in (-(2 * layers + 1) * hidden, -2 * layers * hidden, -hidden):
        hint = "add the RMSNorm weights: two per decoder layer and a final one, hidden_size each."
    elif kv_dim != hidden and diff == layers * 2 * hidden * (hidden - kv_dim):
        hint = (
            "k_proj and v_proj do not output hidden_size numbers: with grouped-query attention "
            "they output fewer (see the config's num_key_value_heads)."
        )
    elif q_dim != hidden and diff == layers * 2 * hidden * (hidden - q_dim):
        hint = "this config gives head_dim: use it instead of computing it."
    else:
        hint = (
            "go through the list in the exercise's text: the embedding, the seven linear layers "
            "and two norms of every decoder layer, the final norm, and the LM head unless tied."
        )
    expect(
        False,
        f"count_params gives {got:,}, expected {expected:,} (off by {diff:+,}). Hint: {hint}",
    )


def _check_gb(full_finetune_gb, config, dtype) -> None:
    """Compare full_finetune_gb with memory.estimate; explain a mismatch."""
    got = full_finetune_gb(dict(config), dtype)
    expect(
        _is_number(got),
        f"full_finetune_gb returned {type(got).__name__}, not a number. "
        "Hint: return the GB as a float.",
    )
    est = estimate(config, method="full", dtype=dtype)
    expected = (est.weights + est.gradients + est.optimizer) / GB
    if isclose(float(got), expected, rel_tol=1e-9):
        return
    n = reference_count_params(config)
    size = BYTES_PER_DTYPE[dtype]
    if isclose(float(got), expected * GB / 1e9, rel_tol=1e-6):
        hint = "a GB here is 2**30 bytes, not 10**9."
    elif isclose(float(got), expected * GB, rel_tol=1e-6):
        hint = "that is bytes: convert them to GB of 2**30 bytes."
    elif isclose(float(got), est.weights / GB, rel_tol=1e-6):
        hint = "that is the weights alone: add the gradients and AdamW's m and v."
    elif isclose(float(got), expected + 4 * n / GB, rel_tol=1e-6):
        hint = "this exercise counts no fp32 master copy."
    elif size != 4 and isclose(float(got), expected + 2 * (4 - size) * n / GB, rel_tol=1e-6):
        hint = f"in {dtype} the weights and gradients take {size} bytes each, not 4."
    else:
        hint = (
            f"weights and gradients in {dtype} ({size} bytes each), AdamW's m and v in fp32, "
            "for every parameter; then GB of 2**30 bytes."
        )
    expect(
        False,
        f"full_finetune_gb(config, {dtype!r}) is {float(got):.6g} GB, expected {expected:.6g} GB. "
        f"Hint: {hint}",
    )


#: (config, dtype) of the visible tests; dtype None checks count_params alone.
COUNT_CASES = [(SMOLLM2, None), (SMOLLM2, "fp32"), (LLAMA_2_7B, None), (LLAMA_2_7B, "bf16")]


@exercise(2, "count_params", "full_finetune_gb")
def count_params(count_params, full_finetune_gb, cases=COUNT_CASES) -> str:
    """Exercise 2: count_params(config) and full_finetune_gb(config, dtype) against memory."""
    for config, dtype in cases:
        if dtype is None:
            _check_count(count_params, config)
        else:
            _check_gb(full_finetune_gb, config, dtype)
    lines = [f"SmolLM2-135M: {count_params(dict(SMOLLM2)):,} parameters"]
    for dtype in ("fp32", "bf16"):
        lines.append(
            f"  full fine-tuning in {dtype}: {full_finetune_gb(dict(SMOLLM2), dtype):.2f} GB"
        )
    return "\n".join(lines)


# ------------------------------------------------------------------------------------ exercise 3


def _options(options) -> tuple[dict, str, int]:
    """The keywords a case passes to the learner's functions, and the dtype and r they mean."""
    kwargs = dict(zip(("dtype", "r"), options, strict=False))
    return kwargs, kwargs.get("dtype", "bf16"), kwargs.get("r", 16)


def _check_bytes(training_bytes, config, method, options) -> int:
    """Compare training_bytes with memory.estimate; explain the first mismatch; return the sum."""
    kwargs, dtype, r = _options(options)
    got = training_bytes(dict(config), method, **kwargs)
    expect(
        isinstance(got, dict) and set(PARTS) <= set(got),
        f"training_bytes must return a dict with keys {PARTS}, got {got!r}. "
        "Hint: return {'weights': ..., 'gradients': ..., 'optimizer': ...}.",
    )
    est = estimate(config, method=method, dtype=dtype, lora_r=r, master_weights=True)
    expected = {part: getattr(est, part) for part in PARTS}
    n_params = reference_count_params(config)
    size = BYTES_PER_DTYPE[dtype]
    for part in ("gradients", "optimizer", "weights"):  # the most telling first
        if isclose(float(got[part]), expected[part], rel_tol=1e-12, abs_tol=1):
            continue
        value = float(got[part])
        hint = "see the list in the exercise's text for what each part holds."
        if method == "full":
            if part == "optimizer" and dtype != "fp32" and isclose(value, 8 * n_params):
                hint = "in bf16/fp16, add the fp32 master copy (4 bytes per parameter)."
            elif part == "optimizer" and dtype == "fp32" and isclose(value, 12 * n_params):
                hint = "in fp32 the weights are the master copy: no extra 4 bytes."
            elif part == "optimizer":
                hint = (
                    "AdamW keeps m and v in fp32 for every parameter, and in bf16/fp16 the fp32 "
                    "master copy is counted with them."
                )
            else:
                hint = f"every parameter trains: {size} bytes per parameter in {dtype}."
        else:
            trainable = expected["gradients"] // 4
            if part == "gradients" and isclose(value, n_params * size):
                hint = "the base model is frozen: only the LoRA adapters have gradients."
            elif part == "optimizer" and isclose(value, n_params * 8):
                hint = "only the LoRA adapters are trained, so only they have AdamW states."
            elif part == "weights" and isclose(value, n_params * size):
                hint = "add the adapters' own weights, 4 bytes each (fp32)."
            elif part == "weights" and isclose(value, (n_params + trainable) * size):
                hint = "PEFT keeps the adapters in fp32: 4 bytes each, whatever the base dtype."
            else:
                hint = (
                    f"LoRA r={r} trains {trainable:,} numbers here, on all 7 projections of "
                    "every decoder layer (k_proj and v_proj are smaller with grouped-query "
                    "attention)."
                )
        expect(
            False,
            f"training_bytes(config, {method!r}, {dtype!r}, r={r}) gives {value:,.0f} bytes of "
            f"{part}, expected {expected[part]:,}. Hint: {hint}",
        )
    return sum(expected.values())


def _check_fit(gpus_that_fit, config, method, gpus, options, needed) -> None:
    """Compare gpus_that_fit with memory.fits on the estimator's numbers."""
    kwargs, _, _ = _options(options)
    got = gpus_that_fit(dict(config), method, dict(gpus), **kwargs)
    expect(
        isinstance(got, list | tuple),
        f"gpus_that_fit returned {type(got).__name__}, not a list. "
        "Hint: return a list of the names of the GPUs that fit.",
    )
    expected = [name for name, gb in gpus.items() if fits(needed, gb)]
    if list(got) == expected:
        return
    everything = [name for name, gb in gpus.items() if needed <= gb * GB]
    decimal = [name for name, gb in gpus.items() if needed <= 0.9 * gb * 1e9]
    if sorted(got) == sorted(expected):
        hint = "list the GPUs in the order of the dict."
    elif list(got) == everything:
        hint = "keep 10 % of each GPU back for the CUDA context: only 90 % of it is usable."
    elif list(got) == decimal:
        hint = "a GB here is 2**30 bytes, not 10**9."
    else:
        hint = (
            "a GPU fits when the three parts of training_bytes together take at most 90 % of "
            "its memory (GB of 2**30 bytes)."
        )
    expect(
        False,
        f"gpus_that_fit(config, {method!r}, ...) gives {list(got)}, expected {expected} "
        f"({needed / GB:.2f} GB needed). Hint: {hint}",
    )


#: (config, method, gpus, dtype, r) of the visible tests. gpus None checks training_bytes alone;
#: a case without dtype or r calls the functions with their defaults (bf16, r=16).
FIT_CASES = [
    (SMOLLM2, "full", GPUS, "fp32", 16),
    (LLAMA_2_7B, "full", GPUS, "bf16", 16),
    (LLAMA_2_7B, "lora", GPUS, "bf16", 16),
    (SMOLLM2, "lora", GPUS, "fp32", 8),
    (LLAMA_2_7B, "lora", {"14 GB": 14, "T4 16 GB": 16}, "bf16", 16),  # 90 % of 14 GB is too little
]


@exercise(3, "training_bytes", "gpus_that_fit")
def training_bytes(training_bytes, gpus_that_fit, cases=FIT_CASES) -> str:
    """Exercise 3: training_bytes and gpus_that_fit against memory.estimate and memory.fits."""
    for config, method, gpus, *options in cases:
        needed = _check_bytes(training_bytes, config, method, options)
        if gpus is not None:
            _check_fit(gpus_that_fit, config, method, gpus, options, needed)
    lines = []
    for method in ("full", "lora"):
        gb = sum(training_bytes(dict(LLAMA_2_7B), method).values()) / GB
        where = gpus_that_fit(dict(LLAMA_2_7B), method, dict(GPUS)) or ["no single GPU"]
        lines.append(f"Llama-2-7B, {method:>4} in bf16: {gb:6.1f} GB -> {', '.join(where)}")
    return "\n".join(lines)
