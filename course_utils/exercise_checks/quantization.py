"""Checks for the exercises of lesson 03 (Quantization): absmax int8, weight memory, NF4, QAT."""

from __future__ import annotations

import torch

from course_utils.exercise_checks.feedback import allclose, equal, exercise, expect, isclose
from course_utils.memory import GB, count_params
from course_utils.quant import (
    absmax_decode,
    absmax_encode,
    double_quant_bits_per_param,
    dtype_table,
    model_weight_bytes,
    nf4_dequantize,
)
from course_utils.quant import absmax_dequantize as reference_absmax_dequantize
from course_utils.quant import absmax_quantize as reference_absmax_quantize
from course_utils.quant import nf4_quantize as reference_nf4_quantize

#: Bound at import, like feedback's comparisons.
_isnan = torch.isnan

# ------------------------------------------------------------------------------------ exercise 1


def _check_zeros(absmax_quantize, absmax_dequantize, x) -> None:
    """A tensor of zeros: no NaN, and zeros come back as zeros."""
    result = absmax_quantize(x.clone())
    expect(
        isinstance(result, tuple) and len(result) == 2,
        "absmax_quantize must return a pair: the int8 codes and the scale. "
        "Hint: return the two as a tuple.",
    )
    x_hat = absmax_dequantize(*result)
    expect(
        isinstance(x_hat, torch.Tensor) and not _isnan(x_hat).any(),
        f"a tensor of {x.numel()} zeros comes back with NaN. Hint: max|x| is 0 there, so choose "
        "a scale of one instead of dividing by zero.",
    )
    expect(
        equal(x_hat.float(), torch.zeros_like(x, dtype=torch.float32)),
        "a tensor of zeros does not come back as zeros. Hint: zero is quantized to the code 0.",
    )


def _scale_hint(x, scale) -> str:
    """Why the learner's scale differs from the reference's."""
    largest = float(x.abs().max())
    if isclose(scale, float(x.max()) / 127, rel_tol=1e-6):
        return "the largest ABSOLUTE value sets the scale, and here it is a negative value."
    if isclose(scale, largest, rel_tol=1e-6):
        return "the scale must map the largest |x| to 127, not to 1."
    if isclose(scale, largest / 128, rel_tol=1e-6) or isclose(scale, largest / 255, rel_tol=1e-6):
        return "symmetric int8 uses the codes -127 ... 127: the largest |x| maps to 127."
    if isclose(scale, 127 / largest, rel_tol=1e-6):
        return "the scale is upside down: it is the size of one step in the units of x."
    return "the scale is the size of one step: the largest |x| of the tensor maps to 127."


def _check_absmax(absmax_quantize, absmax_dequantize, case) -> tuple[float, float]:
    """Compare absmax_quantize/absmax_dequantize with course_utils.quant; explain a mismatch."""
    x = case.clone()
    result = absmax_quantize(x)
    expect(
        isinstance(result, tuple) and len(result) == 2,
        "absmax_quantize must return a pair: the int8 codes and the scale. "
        "Hint: return the two as a tuple.",
    )
    q, scale = result
    expect(equal(x, case), "absmax_quantize changed x in place. Hint: work on a copy.")
    expect(
        isinstance(q, torch.Tensor) and q.dtype == torch.int8,
        f"q must be a torch.int8 tensor, got "
        f"{q.dtype if isinstance(q, torch.Tensor) else type(q).__name__}. "
        "Hint: convert the codes to torch.int8 once they are rounded.",
    )
    expect(
        q.shape == x.shape,
        f"q has shape {tuple(q.shape)}, x has {tuple(x.shape)}. "
        "Hint: quantize value by value and keep the shape (no flattening, no reduction).",
    )
    ref_q, ref_scale = reference_absmax_quantize(x, bits=8)
    expect(
        isclose(float(scale), float(ref_scale), rel_tol=1e-6),
        f"scale is {float(scale):.6g}, expected {float(ref_scale):.6g}. "
        f"Hint: {_scale_hint(x, float(scale))}",
    )
    off = (q.int() - ref_q.int()).abs()
    if not (off.max() <= 1 and (off > 0).float().mean() <= 0.01):
        if equal(q.int(), torch.trunc(x.float() / ref_scale).int()):
            hint = "the codes are truncated toward zero: round each one to the NEAREST integer."
        elif equal(q.int(), torch.round(x.float() * ref_scale).clamp(-128, 127).int()):
            hint = "the values are multiplied by the scale: quantizing divides by it."
        else:
            hint = "each code is the nearest integer to the value divided by the scale."
        expect(
            False,
            f"{int((off > 0).sum())} of {q.numel()} codes differ from the reference, by up to "
            f"{int(off.max())}. Hint: {hint}",
        )
    x_hat = absmax_dequantize(ref_q, ref_scale)
    expected = reference_absmax_dequantize(ref_q, ref_scale)
    expect(
        isinstance(x_hat, torch.Tensor) and x_hat.is_floating_point(),
        "absmax_dequantize must return a float tensor. "
        "Hint: convert the int8 codes to float32 before you scale them.",
    )
    if not (x_hat.shape == x.shape and allclose(x_hat, expected, rtol=1e-6, atol=0)):
        hint = "dequantizing undoes quantizing: each code times the scale."
        if x_hat.shape != x.shape:
            hint = f"keep the shape of q, {tuple(x.shape)}."
        elif allclose(x_hat, ref_q.float() / ref_scale, rtol=1e-6, atol=0):
            hint = "you divided by the scale; dequantizing multiplies by it."
        expect(
            False, f"absmax_dequantize gives wrong values for the reference's codes. Hint: {hint}"
        )
    worst = float((x.float() - absmax_dequantize(q, scale)).abs().max())
    expect(
        worst <= float(ref_scale) / 2 * (1 + 1e-5),
        f"the round trip is off by {worst:.3g}, more than half a step ({float(ref_scale) / 2:.3g}). "
        "Hint: dequantize with the same scale you quantized with.",
    )
    return worst, float(ref_scale)


#: The tensors x of the visible test (a tensor of zeros is checked for NaN and for zeros back).
ABSMAX_CASES = [torch.randn(1000, generator=torch.Generator().manual_seed(0)) * 0.02]


@exercise(1, "absmax_quantize", "absmax_dequantize")
def absmax_quantize(absmax_quantize, absmax_dequantize, cases=ABSMAX_CASES) -> str:
    """Exercise 1: absmax int8 quantization against course_utils.quant."""
    report = ""
    for x in cases:
        if not x.any():
            _check_zeros(absmax_quantize, absmax_dequantize, x)
            continue
        worst, step = _check_absmax(absmax_quantize, absmax_dequantize, x)
        report = report or (
            f"scale {step:.3g}; the worst round-trip error {worst:.3g} is at most half a step."
        )
    return report


# ------------------------------------------------------------------------------------ exercise 2

FORMATS = ("fp32", "fp16", "bf16", "int8", "nf4", "nf4+dq")
_BITS = {row["name"]: row["bits"] for row in dtype_table()}
#: Bits per weight of each format, from course_utils.quant.
REFERENCE_BITS = {
    **{fmt: _BITS[fmt] for fmt in ("fp32", "fp16", "bf16", "int8")},
    "nf4": double_quant_bits_per_param(absmax_bits=None),
    "nf4+dq": double_quant_bits_per_param(),
}


def _check_memory(weight_memory_gb, n_params) -> None:
    """Compare weight_memory_gb with the reference for every format; explain a mismatch."""
    for fmt in FORMATS:
        expected = model_weight_bytes(n_params, REFERENCE_BITS[fmt]) / GB
        got = weight_memory_gb(n_params, fmt)
        expect(
            isinstance(got, int | float | torch.Tensor) and not isinstance(got, bool),
            f"weight_memory_gb returned {type(got).__name__}, not a number. "
            "Hint: return the GB as a float.",
        )
        if isclose(float(got), expected, rel_tol=1e-9, abs_tol=1e-12):
            continue

        def near(value, got=float(got)):
            return isclose(got, value, rel_tol=1e-6)

        hint = (
            f"look up the bits per weight of {fmt} in the exercise's text, then turn bits into "
            "bytes and bytes into GB of 2**30 bytes."
        )
        if near(expected * GB / 1e9):
            hint = "a GB here is 2**30 bytes, not 10**9."
        elif near(expected * 8):
            hint = "you counted bits, not bytes: a byte holds 8 bits."
        elif near(expected * GB):
            hint = "that is bytes: convert them to GB of 2**30 bytes."
        elif fmt in ("nf4", "nf4+dq") and near(n_params * 0.5 / GB):
            hint = "NF4 is not just 4 bits: add the absmax that every block of 64 weights keeps."
        elif fmt == "nf4+dq" and near(model_weight_bytes(n_params, REFERENCE_BITS["nf4"]) / GB):
            hint = (
                "that is NF4 without double quantization: the absmax values shrink to 8 bits, "
                "plus one fp32 scale for every 256 of them."
            )
        elif fmt == "nf4+dq":
            hint = (
                "with double quantization each block of 64 weights keeps an 8-bit absmax, and "
                "every 256 blocks share one fp32 scale."
            )
        expect(
            False,
            f"weight_memory_gb({n_params:,}, {fmt!r}) is {float(got):.6g} GB, "
            f"expected {expected:.6g} GB. Hint: {hint}",
        )


def _check_invalid_format(weight_memory_gb, bad) -> None:
    """weight_memory_gb(1000, bad) must raise ValueError."""
    try:
        got = weight_memory_gb(1000, bad)
    except ValueError:
        return
    except NotImplementedError:
        raise
    except Exception as error:
        expect(
            False,
            f"weight_memory_gb(1000, {bad!r}) raised {type(error).__name__}, not ValueError. "
            "Hint: test the format yourself before you look it up, and raise ValueError.",
        )
    expect(
        False,
        f"weight_memory_gb(1000, {bad!r}) returned {got!r} instead of raising ValueError. "
        "Hint: only the six formats of the exercise are valid (exactly so written); "
        "raise ValueError for anything else.",
    )


#: The parameter counts of the visible test (SmolLM2-135M and Llama-2-7B).
REPORT_MODELS = ("SmolLM2-135M", "Llama-2-7B")
MEMORY_CASES = [count_params(name) for name in REPORT_MODELS]


@exercise(2, "weight_memory_gb")
def weight_memory_gb(weight_memory_gb, cases=MEMORY_CASES, invalid=()) -> str:
    """Exercise 2: weight_memory_gb(n_params, fmt) against course_utils.quant and memory.

    `invalid` are formats for which weight_memory_gb must raise ValueError.
    """
    for n_params in cases:
        _check_memory(weight_memory_gb, n_params)
    for bad in invalid:
        _check_invalid_format(weight_memory_gb, bad)
    lines = []
    for name in REPORT_MODELS:
        n = count_params(name)
        lines.append(f"{name} ({n:,} parameters):")
        lines += [f"  {fmt:<7}{float(weight_memory_gb(n, fmt)):8.3f} GB" for fmt in FORMATS]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------ exercise 3


def _unpack(packed) -> torch.Tensor:
    """The 4-bit indices stored in packed bytes, high half first."""
    flat = packed.reshape(-1).long()
    return torch.stack([flat >> 4, flat & 0x0F], dim=1).reshape(-1)


def _index_hint(w, block_size, mine, ref, ref_absmax) -> str:
    """Why the first index that differs is wrong."""
    flat = w.reshape(-1).float()
    first = int((mine[: flat.numel()] != ref[: flat.numel()]).nonzero()[0])
    block = first // block_size
    value = float(flat[first])
    where = f"value {first} of the flattened w ({value:.4g}) got index {int(mine[first])}, "
    where += f"expected {int(ref[first])}"
    if not flat[block * block_size : (block + 1) * block_size].any():
        return (
            f"{where}: it is in a block of zeros, whose values must get the code of 0.0 "
            "(index 7); do not divide by a zero absmax."
        )
    if isclose(abs(value), float(ref_absmax[block]), rel_tol=1e-6):
        return (
            f"{where}: it is the largest |value| of its block, so divided by the absmax it is "
            "exactly +1 or -1, the last or the first code."
        )
    return (
        f"{where}: divide it by the absmax of ITS block of {block_size} consecutive values, "
        "then take the index of the nearest code value."
    )


def _call(function, *args, **kwargs):
    """Call the learner's function: torch's own NotImplementedError is a wrong answer.

    The stub's bare ``raise NotImplementedError()`` (no message) still means "not answered yet";
    torch raises it with a message for an operation a dtype lacks, e.g. ``<<`` on a float tensor.
    """
    try:
        return function(*args, **kwargs)
    except NotImplementedError as error:
        if not str(error).strip():
            raise
        expect(
            False,
            f"your code raised NotImplementedError: {str(error).strip().splitlines()[0]}. "
            "Hint: torch lacks that operation for the tensor's dtype; bit shifts and | need "
            "integer tensors.",
        )


def _check_nf4(nf4_quantize, case, block_size) -> None:
    """Compare nf4_quantize with the reference; explain the first mismatch."""
    w = case.clone()
    result = _call(nf4_quantize, w, block_size=block_size)
    expect(
        isinstance(result, tuple) and len(result) == 2,
        "nf4_quantize must return a pair: the packed bytes and the absmax values. "
        "Hint: return the two as a tuple.",
    )
    packed, absmax = result
    expect(equal(w, case), "nf4_quantize changed w in place. Hint: work on a copy.")
    ref_packed, ref_absmax = reference_nf4_quantize(w, block_size=block_size)
    n_blocks = ref_absmax.numel()
    expect(
        isinstance(absmax, torch.Tensor) and absmax.numel() == n_blocks,
        f"expected {n_blocks} absmax values ({w.numel()} values in blocks of {block_size}), got "
        f"{absmax.numel() if isinstance(absmax, torch.Tensor) else type(absmax).__name__}. "
        "Hint: one absmax per block, the last block may be shorter.",
    )
    if not allclose(absmax.float().reshape(-1), ref_absmax, rtol=1e-6, atol=0):
        hint = (
            f"the largest |value| of each block of {block_size} consecutive values of the "
            "flattened w."
        )
        pad = n_blocks * block_size - w.numel()
        blocks = torch.nn.functional.pad(w.reshape(-1).float(), (0, pad), value=-float("inf"))
        largest = blocks.view(n_blocks, block_size).amax(dim=1)
        if allclose(absmax.float().reshape(-1), largest, rtol=1e-6, atol=0):
            hint = "the absmax is the largest ABSOLUTE value of the block, not the largest value."
        expect(False, f"the absmax values are wrong. Hint: {hint}")
    expect(
        isinstance(packed, torch.Tensor) and packed.dtype == torch.uint8,
        "packed must be a torch.uint8 tensor. Hint: convert the packed bytes to torch.uint8.",
    )
    expect(
        packed.shape == ref_packed.shape,
        f"packed has shape {tuple(packed.shape)}, expected {tuple(ref_packed.shape)} "
        f"for {w.numel()} values. Hint: two indices per byte, in one column.",
    )
    mine, ref = _unpack(packed), _unpack(ref_packed)
    if equal(mine, ref):
        return
    swapped = torch.stack([mine[1::2], mine[0::2]], dim=1).reshape(-1)
    if equal(swapped, ref):
        hint = "the two halves of each byte are swapped: the first index goes in the high half."
    elif w.numel() % 2 and equal(mine[:-1], ref[:-1]):
        hint = "the padding index is wrong: pad an odd count with 7, the code of 0.0."
    else:
        hint = _index_hint(w, block_size, mine, ref, ref_absmax)
    expect(
        False,
        f"{int((mine != ref).sum())} of {mine.numel()} indices differ from the reference. "
        f"Hint: {hint}",
    )


#: (w, block_size) of the visible test.
NF4_CASES = [(torch.randn(8, 32, generator=torch.Generator().manual_seed(0)) * 0.05, 64)]


@exercise(3, "nf4_quantize")
def nf4_quantize(nf4_quantize, cases=NF4_CASES) -> str:
    """Exercise 3: nf4_quantize(w, block_size) byte for byte against course_utils.quant."""
    for w, block_size in cases:
        _check_nf4(nf4_quantize, w, block_size)
    w = NF4_CASES[0][0].clone()
    w_hat = nf4_dequantize(*_call(nf4_quantize, w.clone()), shape=w.shape)
    return f"relative error of your NF4 round trip: {float((w - w_hat).norm() / w.norm()):.3f}"


# ------------------------------------------------------------------------------------ exercise 4


def _fake_quantize_reference(w: torch.Tensor, bits: int) -> tuple[torch.Tensor, float]:
    """(w quantized and dequantized with one absmax scale, that scale), from course_utils.quant."""
    q, scale = absmax_encode(w.detach(), bits)
    return absmax_decode(q, scale), float(scale)


def _forward_hint(w, bits, out, scale) -> str:
    """Why the forward pass of the learner's fake quantization differs from the reference's."""
    x = w.detach().float()

    def same(candidate) -> bool:
        return allclose(out, candidate, rtol=1e-5, atol=1e-7 * max(scale, 1e-30))

    if same(x):
        return (
            "your forward pass returns w unchanged. Hint: the forward pass must round the "
            "weights to the grid and scale them back; only the gradient skips the rounding."
        )
    if same(torch.round(x / scale)):
        return "these are the integer codes. Hint: dequantize them: scale them back to weights."
    for qmax in (2**bits - 1, 2 ** (bits - 1)):
        if same(torch.round(x / (x.abs().max() / qmax)) * (x.abs().max() / qmax)):
            return (
                f"your grid has {2 * qmax + 1} levels, but {bits} signed bits give the codes "
                "-qmax ... qmax of the exercise's text. Hint: check qmax."
            )
    if same(torch.trunc(x / scale) * scale):
        return "the codes are truncated toward zero. Hint: round each one to the NEAREST integer."
    return (
        f"the values are not w rounded to the {bits}-bit absmax grid. Hint: one scale for the "
        "whole tensor, set by its largest |w|; round w / scale, then multiply back."
    )


def _check_ste(fake_quantize_ste, case, bits, generator) -> tuple[float, float]:
    """Forward = absmax quantize-dequantize, gradient = the upstream gradient; explain a mismatch."""
    w = case.clone().requires_grad_(True)
    out = fake_quantize_ste(w, bits)
    expect(
        isinstance(out, torch.Tensor),
        f"fake_quantize_ste returned {type(out).__name__}, not a tensor. "
        "Hint: return the fake-quantized weights as a tensor.",
    )
    expect(equal(w.detach(), case), "fake_quantize_ste changed w in place. Hint: work on a copy.")
    expect(
        out.shape == case.shape and out.is_floating_point(),
        f"the output has shape {tuple(out.shape)} and dtype {out.dtype}, w has "
        f"{tuple(case.shape)} float32. Hint: keep w's shape and return floats (dequantized).",
    )
    value = out.detach().float()
    expect(
        not _isnan(value).any(),
        f"the output holds NaN for w = {_short(case)}. Hint: where max|w| is 0, use a scale of "
        "one instead of dividing by zero.",
    )
    reference, scale = _fake_quantize_reference(case, bits)
    off = (value - reference).abs() > 1e-4 * scale
    if off.float().mean() > 0.01 or (value - reference).abs().max() > scale * (1 + 1e-4):
        expect(
            False,
            f"at {bits} bits, {int(off.sum())} of {off.numel()} values differ from w quantized "
            f"and dequantized: {_forward_hint(case, bits, value, scale)}",
        )
    expect(
        out.requires_grad,
        "the output is cut off from w: no gradient can reach it. Hint: keep w in the graph and "
        "add the rounding error to it as a constant (detached) for autograd.",
    )
    upstream = torch.randn(case.shape, generator=generator)
    (grad,) = torch.autograd.grad(out, w, upstream, allow_unused=True)
    expect(
        grad is not None,
        "no gradient reaches w. Hint: keep w in the graph and add the rounding error to it as a "
        "constant (detached) for autograd.",
    )
    if not allclose(grad, upstream, rtol=1e-6, atol=1e-7):
        differ = int(((grad - upstream).abs() > 1e-6).sum())
        if float((grad == 0).float().mean()) > 0.9:
            hint = (
                "the gradient is zero almost everywhere: rounding is flat between its steps. "
                "Hint: the straight-through estimator lets the gradient through the rounding "
                "as if it were the identity."
            )
        elif differ <= 2:
            hint = (
                f"the gradient differs from the upstream gradient at {differ} of {grad.numel()} "
                "weights, where the largest |w| sits. Hint: the scale depends on w too; let the "
                "whole rounding correction, scale included, be a constant for autograd."
            )
        else:
            hint = (
                f"the gradient differs from the upstream gradient at {differ} of {grad.numel()} "
                "weights. Hint: with the straight-through estimator, dL/dw is exactly the "
                "gradient that arrives at the output."
            )
        expect(False, hint)
    return float((value - case).abs().max()), scale


def _short(w: torch.Tensor) -> str:
    """A tensor described by its shape and its largest |value|."""
    return f"a {tuple(w.shape)} tensor with max|w| {float(w.abs().max()):.3g}"


#: (w, bits) of the visible test.
STE_CASES = [(torch.randn(8, 16, generator=torch.Generator().manual_seed(0)) * 0.05, 4)]


@exercise(4, "fake_quantize_ste")
def fake_quantize_ste(fake_quantize_ste, cases=STE_CASES) -> str:
    """Exercise 4: fake quantization with the STE: absmax forward, identity gradient."""
    generator = torch.Generator().manual_seed(4)
    report = ""
    for w, bits in cases:
        worst, scale = _check_ste(fake_quantize_ste, w, bits, generator)
        report = report or (
            f"{bits} bits: the forward pass moves w by at most {worst:.3g} (half a step: "
            f"{scale / 2:.3g}), and the gradient reaches w unchanged (the STE)."
        )
    return report
