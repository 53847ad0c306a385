"""Quantization from scratch: the ideas behind int8, NF4, double quantization and GGUF Q4_1.

A weight stored in fp32 costs 4 bytes. Quantization stores it in fewer bits by keeping a small
integer *code* per weight plus a little floating-point *metadata* (a scale, sometimes a zero
point) shared by a group of weights. Dequantization maps the codes back to approximate floats.
Every scheme in this module is a variation on that one idea:

1. **absmax (symmetric) quantization** - one scale per tensor, ``scale = max|x| / 127``,
   ``q = round(x / scale)``. Zero stays exactly zero; one outlier stretches the scale for all.
2. **zero-point (asymmetric) quantization** - map ``[min, max]`` onto ``[0, 255]``. Uses the
   full code range when the values are not centred on zero (e.g. after a ReLU).
3. **blockwise quantization** - one scale per block of 64 values, so an outlier only hurts
   its own block. This is what bitsandbytes and GGUF do.
4. **NF4** (QLoRA, Dettmers et al. 2023) - 16 code values placed at quantiles of a normal
   distribution, because trained weights are roughly normal. A block of 64 weights is scaled
   by its absmax into [-1, 1] and each weight gets the index of the nearest code value.
   :func:`nf4_quantize` reproduces ``bitsandbytes.functional.quantize_4bit`` bit for bit.
5. **double quantization** - the fp32 absmax of every block costs 32/64 = 0.5 bit per
   weight; quantizing those absmax values themselves to 8 bits brings it down to ~0.127.
6. **Q4_1** - the llama.cpp/GGUF format: per block of 32 an fp16 scale ``d`` and an fp16
   minimum ``m``; each weight stores ``round((x - m) / d)`` in 4 bits (5 bits per weight).
7. **fake quantization** for quantization-aware training (QAT) - the forward pass sees the
   weights rounded to the blockwise grid, the backward pass lets the gradient through the
   rounding unchanged (the straight-through estimator, STE).

Everything is written with plain torch tensor operations so that each step can be printed
and inspected in a notebook. Each scheme comes twice: the plain function lesson 03 writes in its
own cells (``absmax_encode``, ``blockwise_encode``, ``nf4_code``, ``nf4_encode``, ... the same
code here, checked by tests/notebooks/test_from_scratch.py) and the public ``..._quantize`` /
``..._dequantize`` that checks its arguments, then calls it. ``fake_quantize`` (lesson 03,
section 11) comes once: it is the lesson's own cell.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from .checks import positive_int

__all__ = [
    "NF4_OFFSET",
    "absmax_decode",
    "absmax_dequantize",
    "absmax_encode",
    "absmax_quantize",
    "blockwise_absmax_dequantize",
    "blockwise_absmax_quantize",
    "blockwise_decode",
    "blockwise_encode",
    "double_dequantize_absmax",
    "double_quant_bits_per_param",
    "double_quantize_absmax",
    "dtype_table",
    "dynamic_map",
    "fake_quantize",
    "model_weight_bytes",
    "nf4_code",
    "nf4_codebook",
    "nf4_decode",
    "nf4_dequantize",
    "nf4_encode",
    "nf4_quantize",
    "nf4_scale_blocks",
    "pad_to_blocks",
    "q4_1_dequantize",
    "q4_1_from_gguf_bytes",
    "q4_1_quantize",
    "q4_1_to_gguf_bytes",
    "quantization_error",
    "zeropoint_decode",
    "zeropoint_dequantize",
    "zeropoint_encode",
    "zeropoint_quantize",
]

#: Outermost quantile of the NF4 grid, as in bitsandbytes' ``create_normal_map``.
NF4_OFFSET = 0.9677083

# Size of the lookup table bitsandbytes' CPU kernel uses for 8-bit blockwise quantization.
_LUT_SIZE = 65536


# --------------------------------------------------------------------------------------------
# Argument checks shared by the public functions
# --------------------------------------------------------------------------------------------


def _check_float_tensor(x: object, name: str = "x") -> torch.Tensor:
    """Return ``x`` if it is a non-empty floating-point tensor, else raise a helpful error."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(
            f"{name} must be a torch.Tensor, got {type(x).__name__}; wrap it with torch.tensor(...)."
        )
    if not x.is_floating_point():
        raise TypeError(
            f"{name} must be a floating-point tensor, got {x.dtype}; convert it with {name}.float()."
        )
    if x.numel() == 0:
        raise ValueError(f"{name} is empty; pass a tensor with at least one element.")
    return x


def _check_tensor(x: object, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Return ``x`` if it is a tensor (of ``dtype`` when given), else raise a helpful error."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}.")
    if dtype is not None and x.dtype != dtype:
        raise TypeError(
            f"{name} must have dtype {dtype}, got {x.dtype}; pass the tensor the quantize "
            "function returned."
        )
    return x


def _check_bits(bits: object, low: int = 2, high: int = 8) -> int:
    """Return ``bits`` if it is an int in ``[low, high]``, else raise a helpful error."""
    if isinstance(bits, bool) or not isinstance(bits, int):
        raise TypeError(f"bits must be an int, got {type(bits).__name__}; use e.g. bits=8.")
    if not low <= bits <= high:
        raise ValueError(f"bits must be between {low} and {high}, got {bits}; use e.g. bits=8.")
    return bits


def _check_shape(shape: object) -> tuple[int, ...]:
    """Return ``shape`` as a tuple of non-negative ints, else raise a helpful error."""
    if isinstance(shape, int):
        shape = (shape,)
    if not isinstance(shape, (tuple, list, torch.Size)) or not all(
        isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in shape
    ):
        raise TypeError(
            f"shape must be a tuple of non-negative ints, got {shape!r}; pass w.shape of the "
            "original tensor."
        )
    return tuple(shape)


# --------------------------------------------------------------------------------------------
# 0. How many bytes does a number cost?
# --------------------------------------------------------------------------------------------


def _float_row(name: str, dtype: torch.dtype) -> dict:
    """One row of :func:`dtype_table` for a torch floating-point dtype."""
    info = torch.finfo(dtype)
    size = torch.empty(0, dtype=dtype).element_size()
    return {
        "name": name,
        "torch_dtype": str(dtype),
        "kind": "float",
        "bits": info.bits,
        "bytes_per_param": size,
        "min": float(info.min),
        "max": float(info.max),
        "smallest_normal": float(info.smallest_normal),
        "eps": float(info.eps),
    }


def _int_row(name: str, dtype: torch.dtype) -> dict:
    """One row of :func:`dtype_table` for a torch integer dtype."""
    info = torch.iinfo(dtype)
    size = torch.empty(0, dtype=dtype).element_size()
    return {
        "name": name,
        "torch_dtype": str(dtype),
        "kind": "int",
        "bits": info.bits,
        "bytes_per_param": size,
        "min": int(info.min),
        "max": int(info.max),
        "smallest_normal": None,
        "eps": None,
    }


def dtype_table() -> list[dict]:
    """Bits, bytes per parameter and range of the number formats used for LLM weights."""
    rows = [
        _float_row("fp32", torch.float32),
        _float_row("fp16", torch.float16),
        _float_row("bf16", torch.bfloat16),
    ]
    for name, attr in (("fp8 e4m3", "float8_e4m3fn"), ("fp8 e5m2", "float8_e5m2")):
        if hasattr(torch, attr):
            rows.append(_float_row(name, getattr(torch, attr)))
    rows.append(_int_row("int8", torch.int8))
    # 4-bit formats have no torch dtype: two values are packed into one uint8 byte.
    rows.append(
        {
            "name": "int4",
            "torch_dtype": None,
            "kind": "int",
            "bits": 4,
            "bytes_per_param": 0.5,
            "min": -8,
            "max": 7,
            "smallest_normal": None,
            "eps": None,
        }
    )
    code = nf4_codebook()
    rows.append(
        {
            "name": "nf4",
            "torch_dtype": None,
            "kind": "lookup (16 values x block absmax)",
            "bits": 4,
            "bytes_per_param": 0.5,
            "min": float(code.min()),
            "max": float(code.max()),
            "smallest_normal": None,
            "eps": None,
        }
    )
    return rows


def model_weight_bytes(n_params: int, bits: float) -> float:
    """Bytes needed to store ``n_params`` weights at ``bits`` bits each (e.g. 4.127 for NF4+DQ)."""
    if isinstance(n_params, bool) or not isinstance(n_params, int):
        raise TypeError(
            f"n_params must be an int, got {type(n_params).__name__}; e.g. 134_515_008."
        )
    if n_params < 0:
        raise ValueError(f"n_params must be >= 0, got {n_params}; pass a parameter count.")
    if isinstance(bits, bool) or not isinstance(bits, (int, float)):
        raise TypeError(f"bits must be a number, got {type(bits).__name__}; e.g. bits=16.")
    if not bits > 0 or not math.isfinite(bits):
        raise ValueError(f"bits must be a positive number, got {bits}; e.g. bits=16.")
    return n_params * bits / 8


# --------------------------------------------------------------------------------------------
# 1. absmax (symmetric) quantization
# --------------------------------------------------------------------------------------------


def absmax_encode(x: torch.Tensor, bits: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes q = round(x / scale) in [-qmax, qmax], with scale = max|x| / qmax."""
    qmax = 2 ** (bits - 1) - 1  # 127 for 8 bits, 7 for 4 bits
    scale = x.abs().max().float() / qmax
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # all zeros: any scale will do
    q = torch.round(x.float() / scale).clamp(-qmax, qmax).to(torch.int8)
    return q, scale


def absmax_quantize(x: torch.Tensor, bits: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric quantization: ``q = round(x / scale)`` with ``scale = max|x| / (2**(bits-1)-1)``."""
    x = _check_float_tensor(x)
    return absmax_encode(x.detach(), _check_bits(bits))


def absmax_decode(q: torch.Tensor, scale: torch.Tensor | float) -> torch.Tensor:
    """Back to floats: x_hat = q * scale."""
    return q.float() * torch.as_tensor(scale, dtype=torch.float32)


def absmax_dequantize(q: torch.Tensor, scale: torch.Tensor | float) -> torch.Tensor:
    """Undo :func:`absmax_quantize`: ``x_hat = q * scale`` (float32)."""
    _check_tensor(q, "q")
    if q.is_floating_point():
        raise TypeError("q must be an integer tensor; pass the q returned by absmax_quantize.")
    return absmax_decode(q, scale)


# --------------------------------------------------------------------------------------------
# 2. zero-point (asymmetric) quantization
# --------------------------------------------------------------------------------------------


def zeropoint_encode(
    x: torch.Tensor, bits: int = 8
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Codes q = round(x / scale) + z in [0, 2**bits - 1]; the code z stands for 0.0 exactly."""
    qmax = 2**bits - 1  # 255 for 8 bits
    x = x.float()
    scale = (x.max() - x.min()) / qmax
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # a constant x: any scale
    zero_point = torch.round(-x.min() / scale).clamp(0, qmax)
    q = (torch.round(x / scale) + zero_point).clamp(0, qmax).to(torch.uint8)
    return q, scale, zero_point.to(torch.int32)


def zeropoint_quantize(
    x: torch.Tensor, bits: int = 8
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric quantization of ``[min, max]`` onto ``[0, 2**bits - 1]`` (uint8 codes)."""
    x = _check_float_tensor(x)
    return zeropoint_encode(x.detach(), _check_bits(bits))


def zeropoint_decode(
    q: torch.Tensor, scale: torch.Tensor | float, zero_point: torch.Tensor | int
) -> torch.Tensor:
    """Back to floats: x_hat = (q - z) * scale."""
    z = torch.as_tensor(zero_point, dtype=torch.float32)
    return (q.float() - z) * torch.as_tensor(scale, dtype=torch.float32)


def zeropoint_dequantize(
    q: torch.Tensor, scale: torch.Tensor | float, zero_point: torch.Tensor | int
) -> torch.Tensor:
    """Undo :func:`zeropoint_quantize`: ``x_hat = (q - zero_point) * scale``."""
    _check_tensor(q, "q", torch.uint8)
    return zeropoint_decode(q, scale, zero_point)


# --------------------------------------------------------------------------------------------
# 3. blockwise absmax quantization
# --------------------------------------------------------------------------------------------


def pad_to_blocks(flat: torch.Tensor, block_size: int) -> torch.Tensor:
    """A 1-D tensor as rows of block_size values, the last row padded with zeros."""
    n_blocks = -(-flat.numel() // block_size)  # ceil(n / block_size)
    padded = torch.nn.functional.pad(flat, (0, n_blocks * block_size - flat.numel()))
    return padded.view(n_blocks, block_size)


def blockwise_encode(
    x: torch.Tensor, block_size: int = 64, bits: int = 8
) -> tuple[torch.Tensor, torch.Tensor]:
    """absmax codes with one scale per block of block_size consecutive values."""
    qmax = 2 ** (bits - 1) - 1
    blocks = pad_to_blocks(x.reshape(-1).float(), block_size)
    scales = blocks.abs().amax(dim=1) / qmax
    scales = torch.where(scales > 0, scales, torch.ones_like(scales))  # an all-zero block
    q = torch.round(blocks / scales[:, None]).clamp(-qmax, qmax).to(torch.int8)
    return q.reshape(-1)[: x.numel()].reshape(x.shape), scales


def blockwise_absmax_quantize(
    x: torch.Tensor, block_size: int = 64, bits: int = 8
) -> tuple[torch.Tensor, torch.Tensor]:
    """absmax quantization with one scale per block of ``block_size`` consecutive values."""
    x = _check_float_tensor(x)
    return blockwise_encode(
        x.detach(), positive_int(block_size, "block_size", "block_size=64"), _check_bits(bits)
    )


def blockwise_decode(q: torch.Tensor, scales: torch.Tensor, block_size: int = 64) -> torch.Tensor:
    """Back to floats: each block's codes times the block's own scale."""
    blocks = pad_to_blocks(q.reshape(-1).float(), block_size)
    x_hat = blocks * scales.float().reshape(-1, 1)
    return x_hat.reshape(-1)[: q.numel()].reshape(q.shape)


def blockwise_absmax_dequantize(
    q: torch.Tensor, scales: torch.Tensor, block_size: int = 64
) -> torch.Tensor:
    """Undo :func:`blockwise_absmax_quantize`: each block times its own scale."""
    _check_tensor(q, "q", torch.int8)
    _check_tensor(scales, "scales")
    block_size = positive_int(block_size, "block_size", "block_size=64")
    n_blocks = -(-q.numel() // block_size)
    if n_blocks != scales.numel():
        raise ValueError(
            f"expected {n_blocks} scales for {q.numel()} values in blocks of "
            f"{block_size}, got {scales.numel()}; pass the same block_size used to quantize."
        )
    return blockwise_decode(q, scales, block_size)


def quantization_error(x: torch.Tensor, x_hat: torch.Tensor) -> dict[str, float]:
    """Mean squared error, max absolute error and relative error ``||x - x_hat|| / ||x||``."""
    x = _check_float_tensor(x)
    x_hat = _check_float_tensor(x_hat, "x_hat")
    if x.numel() != x_hat.numel():
        raise ValueError(
            f"x has {x.numel()} elements but x_hat has {x_hat.numel()}; compare a tensor with "
            "its own dequantized copy."
        )
    a = x.detach().reshape(-1).double()
    diff = a - x_hat.detach().reshape(-1).double()
    norm = a.norm()
    return {
        "mse": float(diff.pow(2).mean()),
        "max_abs": float(diff.abs().max()),
        "relative": float(diff.norm() / norm) if norm > 0 else float(diff.norm()),
    }


# --------------------------------------------------------------------------------------------
# 4. NF4 - NormalFloat 4-bit (QLoRA)
# --------------------------------------------------------------------------------------------


def nf4_code(offset: float = NF4_OFFSET) -> torch.Tensor:
    """The 16 NF4 values: 7 negative and 8 positive normal quantiles and an exact 0, in [-1, 1]."""
    # bitsandbytes takes the probabilities in float32 and the quantiles in float64 (scipy).
    p_pos = torch.linspace(offset, 0.5, 9, dtype=torch.float32)[:-1].double()  # 8 above 0.5
    p_neg = torch.linspace(offset, 0.5, 8, dtype=torch.float32)[:-1].double()  # 7 above 0.5
    positive = torch.special.ndtri(p_pos)  # ndtri: the inverse of the normal CDF
    negative = -torch.special.ndtri(p_neg)
    values = torch.cat([negative, torch.zeros(1, dtype=torch.float64), positive]).float()
    values = values.sort().values
    return values / values.max()


def nf4_codebook(offset: float = NF4_OFFSET) -> torch.Tensor:
    """The 16 NF4 values: normal quantiles, 8 positive + 7 negative + an exact zero, in [-1, 1].

    As in the QLoRA paper's appendix and bitsandbytes' ``create_normal_map``: take 9 evenly
    spaced probabilities from ``offset`` down to 0.5 (8 usable, 0.5 itself would give 0) for
    the positive side and 8 (7 usable) for the negative side, map them through the inverse
    normal CDF, add 0 and divide by the largest value. The asymmetry buys an exact zero.
    """
    if isinstance(offset, bool) or not isinstance(offset, (int, float)):
        raise TypeError(f"offset must be a float, got {type(offset).__name__}; keep 0.9677083.")
    if not 0.5 < offset < 1.0:
        raise ValueError(f"offset must lie in (0.5, 1), got {offset}; keep the default 0.9677083.")
    return nf4_code(offset)


def nf4_scale_blocks(flat: torch.Tensor, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each block divided by its absmax, into [-1, 1], exactly as bitsandbytes rounds it."""
    n_full = flat.numel() - flat.numel() % block_size
    full = flat[:n_full].reshape(-1, block_size)
    absmax = full.abs().amax(dim=1)
    # bitsandbytes multiplies full blocks by 1 / absmax and divides the last, shorter block:
    # x * (1 / a) and x / a can differ in the last bit, so we do the same.
    scaled = torch.clamp(full * (1.0 / absmax.clamp(min=1e-38).view(-1, 1)), -1, 1).reshape(-1)
    if n_full < flat.numel():
        tail = flat[n_full:]
        tail_absmax = tail.abs().max().clamp(min=1e-38)
        absmax = torch.cat([absmax, tail_absmax.reshape(1)])
        scaled = torch.cat([scaled, torch.clamp(tail / tail_absmax, -1, 1)])
    return scaled, absmax


def nf4_encode(w: torch.Tensor, block_size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """NF4 codes of w, two per byte, and each block's absmax (float32)."""
    code = nf4_code()
    midpoints = (code[:-1] + code[1:]) / 2
    scaled, absmax = nf4_scale_blocks(w.reshape(-1).float(), block_size)
    if scaled.numel() % 2:  # an odd count: one more value, 0.0, to fill the last byte
        scaled = torch.nn.functional.pad(scaled, (0, 1))
    # The nearest code is the number of midpoints strictly below (a tie goes to the lower code).
    q = torch.bucketize(scaled, midpoints).to(torch.uint8)
    packed = (q[0::2] << 4) | q[1::2]  # the first index in the high nibble
    return packed.unsqueeze(1), absmax


def nf4_quantize(w: torch.Tensor, block_size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize ``w`` to NF4; returns (packed uint8 of shape ``(ceil(n/2), 1)``, float32 absmax).

    Matches ``bitsandbytes.functional.quantize_4bit(w, blocksize=block_size, quant_type="nf4")``
    on CPU bit for bit:

    * the tensor is flattened and cut into blocks; the last block may be shorter;
    * each value gets the index of the nearest codebook value. "Nearest" is decided with the
      15 midpoints between neighbouring code values: the index is the number of midpoints
      strictly below the value, so a value exactly on a midpoint goes to the *lower* code;
    * two 4-bit indices share a byte, the first element in the high nibble
      (``byte = q[2i] << 4 | q[2i+1]``); an odd count is padded with the code of 0.0 (7).
    """
    w = _check_float_tensor(w, "w")
    return nf4_encode(w.detach(), positive_int(block_size, "block_size", "block_size=64"))


def nf4_decode(
    packed: torch.Tensor, absmax: torch.Tensor, shape: tuple[int, ...], block_size: int = 64
) -> torch.Tensor:
    """Back to floats: code[index] * the absmax of the index's block, in the original shape."""
    n = math.prod(shape)
    flat = packed.reshape(-1)
    indices = torch.stack([flat >> 4, flat & 0x0F], dim=1).reshape(-1)[:n].long()
    blocks = pad_to_blocks(nf4_code()[indices], block_size) * absmax.float().reshape(-1, 1)
    return blocks.reshape(-1)[:n].reshape(shape)


def nf4_dequantize(
    packed: torch.Tensor, absmax: torch.Tensor, shape: tuple[int, ...], block_size: int = 64
) -> torch.Tensor:
    """Undo :func:`nf4_quantize`: ``codebook[index] * absmax[block]`` in float32, reshaped."""
    _check_tensor(packed, "packed", torch.uint8)
    _check_tensor(absmax, "absmax")
    shape = _check_shape(shape)
    block_size = positive_int(block_size, "block_size", "block_size=64")
    n = math.prod(shape)
    if packed.numel() != (n + 1) // 2:
        raise ValueError(
            f"packed has {packed.numel()} bytes but shape {shape} needs {(n + 1) // 2}; pass the "
            "shape of the tensor you quantized."
        )
    n_blocks = -(-n // block_size)
    if absmax.numel() != n_blocks:
        raise ValueError(
            f"expected {n_blocks} absmax values, got {absmax.numel()}; pass the same block_size "
            "used to quantize."
        )
    return nf4_decode(packed, absmax, shape, block_size)


# --------------------------------------------------------------------------------------------
# 5. Double quantization of the absmax values
# --------------------------------------------------------------------------------------------


def double_quant_bits_per_param(
    block_size: int = 64, absmax_block_size: int = 256, absmax_bits: int | None = 8
) -> float:
    """Storage bits per weight of NF4, with double quantization unless ``absmax_bits=None``.

    Without it each block of ``block_size`` weights adds one fp32 absmax: ``4 + 32/block_size``.
    With it the absmax is stored in ``absmax_bits`` and every ``absmax_block_size`` absmax
    values share one fp32 scale: ``4 + absmax_bits/block_size + 32/(block_size*absmax_block_size)``.
    Pass ``absmax_bits=None`` for plain NF4 (fp32 absmax): 4 + 32/64 = 4.5 bits.
    With the QLoRA defaults: 4 + 8/64 + 32/(64*256) = 4.127 bits.
    """
    block_size = positive_int(block_size, "block_size", "block_size=64")
    if absmax_bits is None:
        return 4 + 32 / block_size
    absmax_block_size = positive_int(
        absmax_block_size, "absmax_block_size", "absmax_block_size=256"
    )
    absmax_bits = _check_bits(absmax_bits, 1, 32)
    return 4 + absmax_bits / block_size + 32 / (block_size * absmax_block_size)


def dynamic_map() -> torch.Tensor:
    """bitsandbytes' signed 8-bit "dynamic" code (256 sorted values in [-1, 1]).

    Dettmers (2016): a sign bit, a run of zero bits whose length sets a power of ten, an
    indicator bit, then the remaining bits as a linear fraction. Small numbers get fine steps,
    large numbers coarse ones. Built with the same float32 operations as
    ``bitsandbytes.functional.create_dynamic_map()`` so the tables are identical.
    """
    max_exponent_bits, non_sign_bits = 7, 7
    data: list[float] = []
    for i in range(max_exponent_bits):
        fraction_items = 2 ** (i + non_sign_bits - max_exponent_bits) + 1
        boundaries = torch.linspace(0.1, 1, fraction_items, dtype=torch.float32)
        means = (boundaries[:-1] + boundaries[1:]) / 2.0
        data += ((10 ** (-(max_exponent_bits - 1) + i)) * means).tolist()
        data += (-(10 ** (-(max_exponent_bits - 1) + i)) * means).tolist()
    data += [0.0, 1.0]
    return torch.tensor(sorted(data), dtype=torch.float32)


def _lut_nearest_index(scaled: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    """Nearest code index the way bitsandbytes' CPU kernel finds it: via a 65536-entry table.

    The range [-1, 1] is cut into 65536 points; each point remembers its nearest code value.
    A value is first rounded to the closest point, then looked up. This is *almost* the exact
    nearest value: about 1 value in 1000 lands on the neighbour when it lies very close to a
    midpoint. We copy the table trick because we want bit-for-bit equality.
    """
    midpoints = (code[:-1] + code[1:]) / 2
    points = -1.0 + (2.0 * torch.arange(_LUT_SIZE, dtype=torch.float32)) / (_LUT_SIZE - 1)
    lut = torch.searchsorted(midpoints, points)  # number of midpoints strictly below the point
    v = scaled.clamp(-1.0, 1.0)
    idx = ((v + 1.0) * 0.5 * (_LUT_SIZE - 1) + 0.5).to(torch.int64)
    return lut[idx]


def double_quantize_absmax(
    absmax: torch.Tensor, block_size: int = 256
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """8-bit blockwise quantization of NF4's absmax values, as bitsandbytes' double quant does.

    Returns ``(q uint8, absmax2 float32 per block of 256, offset float32)``: the mean is
    subtracted first (absmax values are all positive; centring them uses the signed code
    better), then every block of 256 is scaled by its own absmax and mapped to the dynamic
    8-bit code. Matches ``quantize_4bit(..., compress_statistics=True)`` on CPU
    (``quant_state.absmax``, ``quant_state.state2.absmax``, ``quant_state.offset``) for
    bitsandbytes 0.50, whose CPU kernel finds the nearest code with a lookup table.
    """
    absmax = _check_float_tensor(absmax, "absmax")
    block_size = positive_int(block_size, "block_size", "block_size=64")
    flat = absmax.detach().reshape(-1).float()
    offset = flat.mean()
    blocks = pad_to_blocks(flat - offset, block_size)  # zero padding never raises a maximum
    absmax2 = blocks.abs().amax(dim=1)
    inverse = torch.where(absmax2 > 0, 1.0 / absmax2, torch.zeros_like(absmax2))
    scaled = blocks * inverse.view(-1, 1)  # the C kernel multiplies by 1/absmax too
    q = _lut_nearest_index(scaled, dynamic_map()).to(torch.uint8)
    q[absmax2 == 0] = 0  # bitsandbytes writes index 0 for an all-zero block
    return q.reshape(-1)[: flat.numel()].reshape(absmax.shape), absmax2, offset


def double_dequantize_absmax(
    q: torch.Tensor, absmax2: torch.Tensor, offset: torch.Tensor | float, block_size: int = 256
) -> torch.Tensor:
    """Undo :func:`double_quantize_absmax`: ``code[q] * absmax2[block] + offset``."""
    _check_tensor(q, "q", torch.uint8)
    _check_tensor(absmax2, "absmax2")
    block_size = positive_int(block_size, "block_size", "block_size=64")
    values = pad_to_blocks(dynamic_map()[q.reshape(-1).long()], block_size)
    if values.shape[0] != absmax2.numel():
        raise ValueError(
            f"expected {values.shape[0]} absmax2 values, got {absmax2.numel()}; pass the same "
            "block_size used to quantize."
        )
    out = (values * absmax2.float().reshape(-1, 1)).reshape(-1)[: q.numel()]
    return out + torch.as_tensor(offset, dtype=torch.float32)


# --------------------------------------------------------------------------------------------
# 6. GGUF Q4_1
# --------------------------------------------------------------------------------------------


def _q4_1_blocks(w: torch.Tensor, block_size: int) -> torch.Tensor:
    """Check ``w`` for Q4_1 and return it as float32 rows of ``block_size`` values."""
    w = _check_float_tensor(w, "w")
    block_size = positive_int(block_size, "block_size", "block_size=64")
    if block_size % 2:
        raise ValueError(f"block_size must be even, got {block_size}; GGUF uses 32.")
    if w.dim() == 0 or w.shape[-1] % block_size:
        raise ValueError(
            f"the last dimension ({tuple(w.shape)}) must be a multiple of block_size="
            f"{block_size}, as in GGUF; pad or reshape the tensor first."
        )
    return w.detach().float().reshape(-1, block_size)


def q4_1_quantize(
    w: torch.Tensor, block_size: int = 32
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """GGUF Q4_1: per block an fp16 scale ``d = (max - min) / 15`` and fp16 min ``m``.

    Returns ``(packed uint8 (n_blocks, block_size/2), d float16, m float16)``. Like llama.cpp
    and ``gguf.quants``, the codes are computed with the float32 ``d`` and ``min`` as
    ``q = trunc((x - min) / d + 0.5)`` (round half up), clipped to [0, 15]; only then are
    ``d`` and ``m`` rounded to fp16 for storage. Byte ``j`` of a block holds element ``j``
    in its low nibble and element ``j + block_size/2`` in its high nibble.
    """
    blocks = _q4_1_blocks(w, block_size)
    lo = blocks.amin(dim=1, keepdim=True)
    hi = blocks.amax(dim=1, keepdim=True)
    d = (hi - lo) / 15
    inv_d = torch.where(d == 0, torch.zeros_like(d), 1 / d)
    q = torch.trunc((blocks - lo) * inv_d + 0.5).clamp(0, 15).to(torch.uint8)
    half = block_size // 2
    packed = q[:, :half] | (q[:, half:] << 4)
    return packed, d.reshape(-1).half(), lo.reshape(-1).half()


def q4_1_dequantize(
    packed: torch.Tensor, d: torch.Tensor, m: torch.Tensor, shape: tuple[int, ...]
) -> torch.Tensor:
    """Undo :func:`q4_1_quantize`: ``x_hat = d * q + m`` per block, in float32."""
    _check_tensor(packed, "packed", torch.uint8)
    _check_tensor(d, "d")
    _check_tensor(m, "m")
    shape = _check_shape(shape)
    if packed.dim() != 2 or packed.shape[0] != d.numel() or d.numel() != m.numel():
        raise ValueError(
            "packed must be (n_blocks, block_size/2) with one d and one m per block; pass the "
            "three tensors q4_1_quantize returned."
        )
    if packed.numel() * 2 != math.prod(shape):
        raise ValueError(
            f"packed holds {packed.numel() * 2} values but shape {shape} has "
            f"{math.prod(shape)}; pass the shape of the tensor you quantized."
        )
    q = torch.cat([packed & 0x0F, packed >> 4], dim=1).float()
    x_hat = d.float().reshape(-1, 1) * q + m.float().reshape(-1, 1)
    return x_hat.reshape(shape)


def q4_1_to_gguf_bytes(packed: torch.Tensor, d: torch.Tensor, m: torch.Tensor) -> np.ndarray:
    """Lay the blocks out as in a GGUF file: ``[d fp16][m fp16][block_size/2 bytes]`` each."""
    _check_tensor(packed, "packed", torch.uint8)
    _check_tensor(d, "d", torch.float16)
    _check_tensor(m, "m", torch.float16)
    d_bytes = d.reshape(-1, 1).contiguous().view(torch.uint8)
    m_bytes = m.reshape(-1, 1).contiguous().view(torch.uint8)
    return torch.cat([d_bytes, m_bytes, packed], dim=1).numpy()


def q4_1_from_gguf_bytes(
    raw: np.ndarray, block_size: int = 32
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Split raw GGUF Q4_1 bytes back into ``(packed, d, m)`` for :func:`q4_1_dequantize`."""
    if not isinstance(raw, np.ndarray) or raw.dtype != np.uint8:
        raise TypeError("raw must be a uint8 numpy array, e.g. gguf.quants.quantize(...) output.")
    block_size = positive_int(block_size, "block_size", "block_size=64")
    row = 4 + block_size // 2
    if raw.size % row:
        raise ValueError(
            f"raw has {raw.size} bytes, not a multiple of {row} bytes per block; pass the "
            "block_size the data was written with (32 for GGUF)."
        )
    blocks = torch.from_numpy(np.ascontiguousarray(raw).reshape(-1, row))
    d = blocks[:, 0:2].contiguous().view(torch.float16).reshape(-1)
    m = blocks[:, 2:4].contiguous().view(torch.float16).reshape(-1)
    return blocks[:, 4:].contiguous(), d, m


# --------------------------------------------------------------------------------------------
# 7. Quantization-aware training: fake quantization with the straight-through estimator
# --------------------------------------------------------------------------------------------


def fake_quantize(w: torch.Tensor, bits: int, block_size: int = 64) -> torch.Tensor:
    """Forward: w rounded to the blockwise absmax grid. Backward: the gradient passes unchanged."""
    w_hat = blockwise_decode(*blockwise_encode(w.detach(), block_size, bits), block_size)
    return w + (w_hat - w).detach()  # the value of w_hat, the gradient of w: the STE
