"""Tests for course_utils.quant: the from-scratch code must agree with bitsandbytes and gguf."""

import numpy as np
import pytest
import torch

from course_utils import quant as Q

bnb_functional = pytest.importorskip("bitsandbytes.functional")
gguf_quants = pytest.importorskip("gguf.quants")
GGMLQuantizationType = pytest.importorskip("gguf").GGMLQuantizationType


def _bnb_nf4(w, compress_statistics=False):
    """bitsandbytes' reference NF4 quantization on CPU."""
    return bnb_functional.quantize_4bit(
        w, blocksize=64, quant_type="nf4", compress_statistics=compress_statistics
    )


# ------------------------------------------------------------------------------ dtype table


def test_dtype_table_is_computed_from_torch():
    rows = {row["name"]: row for row in Q.dtype_table()}
    assert rows["fp32"]["bytes_per_param"] == 4 and rows["fp32"]["bits"] == 32
    assert rows["fp16"]["max"] == 65504.0
    assert rows["bf16"]["max"] == float(torch.finfo(torch.bfloat16).max)
    assert rows["bf16"]["eps"] == 2**-7 and rows["fp16"]["eps"] == 2**-10
    assert rows["int8"]["min"] == -128 and rows["int8"]["max"] == 127
    assert rows["nf4"]["bytes_per_param"] == 0.5 and rows["int4"]["bytes_per_param"] == 0.5
    if hasattr(torch, "float8_e4m3fn"):
        assert rows["fp8 e4m3"]["max"] == 448.0 and rows["fp8 e4m3"]["bytes_per_param"] == 1
        assert rows["fp8 e5m2"]["max"] == 57344.0


def test_model_weight_bytes():
    assert Q.model_weight_bytes(7_000_000_000, 16) == 14e9
    assert Q.model_weight_bytes(1000, 4.5) == 562.5
    with pytest.raises(ValueError, match="positive"):
        Q.model_weight_bytes(10, 0)
    with pytest.raises(TypeError, match="n_params"):
        Q.model_weight_bytes(1.5, 8)


# ------------------------------------------------------------------------------ int8 schemes


@pytest.mark.parametrize("bits", [8, 4])
def test_absmax_round_trip_error_is_at_most_half_a_step(bits):
    x = torch.randn(1000) * 3
    q, scale = Q.absmax_quantize(x, bits=bits)
    assert q.dtype == torch.int8
    assert int(q.abs().max()) == 2 ** (bits - 1) - 1  # the absmax value uses the last code
    x_hat = Q.absmax_dequantize(q, scale)
    assert (x - x_hat).abs().max() <= scale / 2 + 1e-6


def test_zeropoint_round_trip_and_exact_zero():
    x = torch.rand(1000) * 5 - 1  # not centred on zero: [-1, 4]
    x[0] = 0.0
    q, scale, zero_point = Q.zeropoint_quantize(x)
    assert q.dtype == torch.uint8 and int(q.min()) == 0 and int(q.max()) == 255
    x_hat = Q.zeropoint_dequantize(q, scale, zero_point)
    assert (x - x_hat).abs().max() <= scale / 2 + 1e-6
    assert x_hat[0] == 0.0


def test_blockwise_beats_per_tensor_on_outliers():
    torch.manual_seed(0)
    x = torch.randn(64 * 32)
    x[::500] = 80.0  # a few outliers, as in LLM activations/weights
    per_tensor = Q.quantization_error(x, Q.absmax_dequantize(*Q.absmax_quantize(x)))
    q, scales = Q.blockwise_absmax_quantize(x, block_size=64)
    blockwise = Q.quantization_error(x, Q.blockwise_absmax_dequantize(q, scales, 64))
    assert scales.shape == (32,)
    assert blockwise["mse"] < per_tensor["mse"] / 4  # only 5 of 32 blocks hold an outlier
    assert blockwise["relative"] < per_tensor["relative"]


def test_blockwise_handles_a_partial_last_block():
    x = torch.randn(5, 13)
    q, scales = Q.blockwise_absmax_quantize(x, block_size=16)
    assert q.shape == x.shape and scales.shape == (5,)
    x_hat = Q.blockwise_absmax_dequantize(q, scales, 16)
    assert torch.all((x - x_hat).abs().reshape(-1) <= scales.repeat_interleave(16)[:65] / 2 + 1e-6)


def test_quantization_error_values():
    err = Q.quantization_error(torch.tensor([3.0, 4.0]), torch.tensor([3.0, 3.0]))
    assert err == {"mse": 0.5, "max_abs": 1.0, "relative": pytest.approx(0.2)}


# ------------------------------------------------------------------------------ NF4


def test_nf4_codebook_equals_bitsandbytes():
    code = Q.nf4_codebook()
    # bitsandbytes' table: the hard-coded list in get_4bit_type("nf4") (= create_normal_map).
    reference = bnb_functional.get_4bit_type("nf4", device="cpu")
    assert code.shape == (16,) and code.dtype == torch.float32
    assert torch.allclose(code, reference, atol=1e-7, rtol=0)
    assert torch.equal(code, reference)  # in fact identical to the bit
    assert (code > 0).sum() == 8 and (code < 0).sum() == 7 and (code == 0).sum() == 1
    assert code[0] == -1 and code[-1] == 1 and torch.all(code[1:] > code[:-1])


SHAPES = [(64,), (128, 64), (33, 77), (3, 5), (7, 22), (256, 1000)]


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_nf4_quantize_matches_bitsandbytes_bit_for_bit(shape):
    torch.manual_seed(sum(shape))
    w = torch.randn(shape) * 0.02
    packed, absmax = Q.nf4_quantize(w)
    ref_packed, state = _bnb_nf4(w)
    assert packed.dtype == torch.uint8 and packed.shape == ref_packed.shape
    assert torch.equal(packed, ref_packed)
    assert torch.equal(absmax, state.absmax)


# Shapes with an even last dimension: bitsandbytes dequantizes them with its C kernel. (Odd
# last dimensions go through a torch.compile'd fallback that takes seconds to compile.)
@pytest.mark.parametrize("shape", [(64,), (128, 64), (7, 22), (256, 1000)], ids=str)
def test_nf4_dequantize_matches_bitsandbytes(shape):
    torch.manual_seed(1 + sum(shape))
    w = torch.randn(shape)
    packed, absmax = Q.nf4_quantize(w)
    ours = Q.nf4_dequantize(packed, absmax, w.shape)
    ref_packed, state = _bnb_nf4(w)
    theirs = bnb_functional.dequantize_4bit(ref_packed, state)
    assert ours.shape == w.shape
    assert torch.equal(ours.reshape(-1), theirs.reshape(-1))  # bnb returns (1, n) for 1-D input


def test_nf4_bf16_input_matches_bitsandbytes():
    w = torch.randn(16, 96).to(torch.bfloat16)
    packed, absmax = Q.nf4_quantize(w)
    ref_packed, state = _bnb_nf4(w)
    assert torch.equal(packed, ref_packed) and torch.equal(absmax, state.absmax)


def test_nf4_ties_go_to_the_lower_code_like_bitsandbytes():
    code = Q.nf4_codebook()
    midpoints = (code[:-1] + code[1:]) / 2
    w = torch.zeros(64)
    w[0] = 1.0  # absmax 1: the other values are scaled by exactly 1
    w[1:16] = midpoints
    packed, _ = Q.nf4_quantize(w)
    assert torch.equal(packed, _bnb_nf4(w)[0])
    indices = torch.stack([packed[:, 0] >> 4, packed[:, 0] & 15], 1).reshape(-1)
    assert indices[1:16].tolist() == list(range(15))  # midpoint i -> code i, not i + 1


def test_nf4_full_blocks_use_the_reciprocal_and_the_tail_block_divides():
    # x * (1/a) and x / a differ in the last bit here, on opposite sides of a midpoint.
    a, x = 1.8028894662857056, -0.8293206095695496
    w = torch.zeros(66)
    w[0], w[1], w[64], w[65] = a, x, a, x  # the same pair in a full block and in the tail
    packed, _ = Q.nf4_quantize(w)
    assert torch.equal(packed, _bnb_nf4(w)[0])
    assert int(packed[0, 0] & 15) == 3 and int(packed[32, 0] & 15) == 2


def test_nf4_round_trip_error_is_small():
    w = torch.randn(4096)
    packed, absmax = Q.nf4_quantize(w)
    assert packed.numel() == 2048  # half a byte per weight
    err = Q.quantization_error(w, Q.nf4_dequantize(packed, absmax, w.shape))
    assert 0.02 < err["relative"] < 0.15


# ------------------------------------------------------------------------------ double quant


def test_double_quant_bits_per_param():
    assert Q.double_quant_bits_per_param(absmax_bits=None) == 4.5
    assert Q.double_quant_bits_per_param() == pytest.approx(4.127, abs=1e-3)
    assert Q.double_quant_bits_per_param() == 4 + 8 / 64 + 32 / (64 * 256)


def test_dynamic_map_equals_bitsandbytes():
    assert torch.equal(Q.dynamic_map(), bnb_functional.create_dynamic_map())


@pytest.mark.parametrize("n_blocks", [1, 300, 1000, 2049])
def test_double_quantize_matches_bitsandbytes(n_blocks):
    torch.manual_seed(n_blocks)
    w = torch.randn(n_blocks * 64) * 0.05
    packed, absmax = Q.nf4_quantize(w)
    q, absmax2, offset = Q.double_quantize_absmax(absmax)
    ref_packed, state = _bnb_nf4(w, compress_statistics=True)
    assert torch.equal(packed, ref_packed)
    assert torch.equal(q, state.absmax)
    assert torch.equal(absmax2, state.state2.absmax)
    assert torch.equal(offset, state.offset)
    restored = Q.double_dequantize_absmax(q, absmax2, offset)
    ours = Q.nf4_dequantize(packed, restored, w.shape)
    assert torch.equal(ours, bnb_functional.dequantize_4bit(ref_packed, state).reshape(-1))


# ------------------------------------------------------------------------------ GGUF Q4_1


@pytest.mark.parametrize("shape", [(32,), (4, 64), (3, 96), (64, 256)], ids=str)
def test_q4_1_matches_gguf(shape):
    torch.manual_seed(len(shape) + shape[-1])
    w = torch.randn(shape) * 0.1
    reference = gguf_quants.quantize(w.numpy(), GGMLQuantizationType.Q4_1)
    packed, d, m = Q.q4_1_quantize(w)
    assert d.dtype == torch.float16 and m.dtype == torch.float16
    ours = Q.q4_1_to_gguf_bytes(packed, d, m).reshape(reference.shape)
    np.testing.assert_array_equal(ours, reference)
    reference_dq = gguf_quants.dequantize(reference, GGMLQuantizationType.Q4_1)
    ours_dq = Q.q4_1_dequantize(*Q.q4_1_from_gguf_bytes(reference), shape)
    np.testing.assert_array_equal(ours_dq.numpy(), reference_dq)
    assert reference.nbytes * 8 / w.numel() == 5.0  # 4 bits + (16 + 16) / 32


def test_q4_1_rounds_halves_up_like_gguf():
    w = torch.zeros(32)
    w[1], w[2], w[3] = 15.0, 0.5, 2.5  # d = 1, min = 0: codes of 0.5 and 2.5 are ties
    packed, d, m = Q.q4_1_quantize(w)
    reference = gguf_quants.quantize(w.numpy(), GGMLQuantizationType.Q4_1)
    np.testing.assert_array_equal(Q.q4_1_to_gguf_bytes(packed, d, m).reshape(-1), reference)
    assert int(packed[0, 2]) == 1 and int(packed[0, 3]) == 3  # round half up, not to even


def test_q4_1_error_is_at_most_half_a_step_plus_fp16_rounding():
    w = torch.randn(8, 32)
    packed, d, m = Q.q4_1_quantize(w)
    x_hat = Q.q4_1_dequantize(packed, d, m, w.shape)
    step = d.float().repeat_interleave(32).reshape(w.shape)
    assert torch.all((w - x_hat).abs() <= step / 2 + 2e-3)


# ------------------------------------------------------------------------------ bad inputs


def test_bad_inputs_raise_helpful_errors():
    with pytest.raises(TypeError, match="torch.Tensor"):
        Q.absmax_quantize([1.0, 2.0])
    with pytest.raises(TypeError, match="floating-point"):
        Q.nf4_quantize(torch.arange(10))
    with pytest.raises(ValueError, match="empty"):
        Q.nf4_quantize(torch.empty(0))
    with pytest.raises(ValueError, match="bits must be between"):
        Q.absmax_quantize(torch.randn(4), bits=16)
    with pytest.raises(ValueError, match="block_size must be a positive integer"):
        Q.blockwise_absmax_quantize(torch.randn(4), block_size=0)
    with pytest.raises(ValueError, match="multiple of block_size"):
        Q.q4_1_quantize(torch.randn(4, 33))
    packed, absmax = Q.nf4_quantize(torch.randn(128))
    with pytest.raises(ValueError, match="shape"):
        Q.nf4_dequantize(packed, absmax, (10, 10))
    with pytest.raises(ValueError, match="block_size"):
        Q.nf4_dequantize(packed, absmax, (128,), block_size=32)
    with pytest.raises(ValueError, match="offset"):
        Q.nf4_codebook(offset=1.5)


# ------------------------------------------------------------------------------ block sizes


def test_block_size_must_fit_where_the_format_requires_it():
    with pytest.raises(ValueError, match="even"):
        Q.q4_1_quantize(torch.randn(4, 33), block_size=33)
    with pytest.raises(ValueError, match="multiple of block_size"):
        Q.q4_1_quantize(torch.randn(4, 48), block_size=32)
    with pytest.raises(TypeError, match="block_size must be a positive integer"):
        Q.nf4_quantize(torch.randn(128), block_size=64.0)
    q, scales = Q.blockwise_absmax_quantize(torch.randn(256), block_size=64)
    with pytest.raises(ValueError, match="same block_size"):
        Q.blockwise_absmax_dequantize(q, scales, block_size=32)
    q8, absmax2, offset = Q.double_quantize_absmax(torch.rand(600), block_size=256)
    with pytest.raises(ValueError, match="same block_size"):
        Q.double_dequantize_absmax(q8, absmax2, offset, block_size=128)
    with pytest.raises(ValueError, match="shape"):
        Q.q4_1_dequantize(*Q.q4_1_quantize(torch.randn(2, 64)), (3, 64))


# ------------------------------------------------------------------------------ fake quantization


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_fake_quantize_forward_is_the_blockwise_round_trip_and_its_gradient_the_identity(bits):
    g = torch.Generator().manual_seed(bits)
    w = (torch.randn(6, 100, generator=g) * 0.05).requires_grad_(True)
    out = Q.fake_quantize(w, bits, block_size=64)
    expected = Q.blockwise_decode(*Q.blockwise_encode(w.detach(), 64, bits), 64)
    assert torch.equal(out.detach(), expected)  # w + (w_hat - w) is w_hat to the bit
    upstream = torch.randn(w.shape, generator=g)
    out.backward(upstream)
    assert torch.equal(w.grad, upstream)  # the straight-through estimator


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_fake_quantize_equals_torchs_per_channel_fake_quantize(bits):
    """A block that is one row is torch's per-channel scheme: same values, same gradient."""
    g = torch.Generator().manual_seed(10 + bits)
    w = (torch.randn(32, 64, generator=g) * 0.02).requires_grad_(True)
    w_torch = w.detach().clone().requires_grad_(True)
    qmax = 2 ** (bits - 1) - 1
    scales = w.detach().abs().amax(dim=1) / qmax
    zero_points = torch.zeros(32, dtype=torch.int32)
    theirs = torch.fake_quantize_per_channel_affine(w_torch, scales, zero_points, 0, -qmax, qmax)
    ours = Q.fake_quantize(w, bits, block_size=64)
    assert torch.equal(ours.detach(), theirs.detach())
    upstream = torch.randn(w.shape, generator=g)
    ours.backward(upstream)
    theirs.backward(upstream)
    assert torch.equal(w.grad, w_torch.grad)


def test_fake_quantize_of_zeros_and_of_a_partial_block():
    zeros = torch.zeros(10, requires_grad=True)
    assert torch.equal(Q.fake_quantize(zeros, 4).detach(), torch.zeros(10))
    w = torch.randn(3, 7, generator=torch.Generator().manual_seed(0))
    out = Q.fake_quantize(w, 4, block_size=8)  # 21 values: blocks of 8, 8 and 5
    assert out.shape == w.shape
    assert (out - w).abs().max() <= w.abs().max() / 7 / 2 + 1e-7
