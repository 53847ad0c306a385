"""Lesson 03's exercise checks: the usual mistakes get the hint that names them."""

import math

import pytest
import torch

from course_utils import quant
from course_utils.exercise_checks import quantization as check

BITS = {"fp32": 32, "fp16": 16, "bf16": 16, "int8": 8, "nf4": 4.5, "nf4+dq": 4 + 8 / 64 + 1 / 512}


@pytest.fixture(autouse=True)
def _learner(monkeypatch):
    monkeypatch.delenv("NBGRADER_EXECUTION", raising=False)


def _said(capsys) -> str:
    return capsys.readouterr().out.strip()


def _dequantize(q, scale):
    return q.float() * scale


def _memory(bits):
    def weight_memory_gb(n_params, fmt):
        if fmt not in bits:
            raise ValueError(fmt)
        return n_params * bits[fmt] / 8 / 2**30

    return weight_memory_gb


def _nf4(w, block_size=64, swap=False, signed_max=False):
    """A learner's NF4: right by default, or with one of two usual mistakes."""
    code = quant.nf4_codebook()
    flat = w.reshape(-1).float()
    n, n_blocks = flat.numel(), math.ceil(flat.numel() / block_size)
    blocks = torch.nn.functional.pad(flat, (0, n_blocks * block_size - n)).view(n_blocks, -1)
    absmax = blocks.amax(dim=1) if signed_max else blocks.abs().amax(dim=1)
    q = ((blocks / absmax.clamp(min=1e-38)[:, None]).reshape(-1, 1) - code).abs().argmin(dim=1)
    q = torch.cat([q[:n], torch.tensor([7] * (n % 2), dtype=torch.long)])
    high, low = (q[1::2], q[0::2]) if swap else (q[0::2], q[1::2])
    return ((high << 4) | low).to(torch.uint8)[:, None], absmax


@pytest.mark.parametrize(
    ("quantize", "hint"),
    [
        (lambda x: ((x / (x.abs().max() / 127)).to(torch.int8), x.abs().max() / 127), "truncated"),
        (lambda x: (torch.round(x / x.abs().max()).to(torch.int8), x.abs().max()), "to 127"),
        (lambda x: torch.round(x * 127 / x.abs().max()).to(torch.int8), "a pair"),
    ],
)
def test_absmax_mistakes(quantize, hint, capsys):
    check.absmax_quantize(quantize, _dequantize)
    said = _said(capsys)
    assert said.startswith("❌ Exercise 1") and hint in said, said


def test_absmax_signed_max_is_named_on_a_negative_tensor(capsys):
    def quantize(x):
        scale = x.max() / 127
        return torch.round(x / scale).clamp(-127, 127).to(torch.int8), scale

    check.absmax_quantize(quantize, _dequantize, cases=[-3 * torch.rand(50)])
    assert "ABSOLUTE" in _said(capsys)


def test_absmax_dividing_dequantize_is_named(capsys):
    check.absmax_quantize(quant.absmax_quantize, lambda q, scale: q.float() / scale)
    assert "you divided by the scale" in _said(capsys)


def test_absmax_zeros_must_not_give_nan(capsys):
    def quantize(x):
        scale = x.abs().max() / 127
        return torch.round(x / scale), scale  # 0 / 0 is NaN, and NaN stays in a float q

    check.absmax_quantize(quantize, _dequantize, cases=[torch.zeros(10)])
    assert "NaN" in _said(capsys)


def test_absmax_right_then_its_report(capsys):
    check.absmax_quantize(quant.absmax_quantize, _dequantize)
    said = _said(capsys)
    assert said.startswith("✅ Exercise 1") and "half a step" in said, said


@pytest.mark.parametrize(
    ("bits", "hint"),
    [
        (dict(BITS, nf4=4, **{"nf4+dq": 4}), "not just 4 bits"),
        (dict(BITS, **{"nf4+dq": 4.5}), "without double quantization"),
        ({fmt: 8 * bits for fmt, bits in BITS.items()}, "bits, not bytes"),
    ],
)
def test_weight_memory_mistakes(bits, hint, capsys):
    check.weight_memory_gb(_memory(bits))
    said = _said(capsys)
    assert said.startswith("❌ Exercise 2") and hint in said, said


def test_weight_memory_right_and_the_value_error(capsys):
    check.weight_memory_gb(_memory(BITS), cases=[1, 7_000_000_000], invalid=("FP32", "int4"))
    assert _said(capsys) == "✅ Exercise 2: `weight_memory_gb` passes the grader's further cases."
    check.weight_memory_gb(lambda n, fmt: n * BITS[fmt] / 8 / 2**30, cases=[], invalid=("x",))
    assert "raised KeyError, not ValueError" in _said(capsys)


@pytest.mark.parametrize(
    ("options", "hint"),
    [({"swap": True}, "swapped"), ({"signed_max": True}, "ABSOLUTE")],
)
def test_nf4_mistakes(options, hint, capsys):
    check.nf4_quantize(lambda w, block_size=64: _nf4(w, block_size, **options))
    said = _said(capsys)
    assert said.startswith("❌ Exercise 3") and hint in said, said


def test_nf4_right_on_the_hidden_kinds_of_cases(capsys):
    g = torch.Generator().manual_seed(3)
    cases = [(torch.randn(99, generator=g), 64), (torch.randn(3, 5, 7, generator=g), 32)]
    cases.append((torch.cat([torch.zeros(64), torch.randn(64, generator=g)]), 64))
    check.nf4_quantize(_nf4, cases=cases)
    assert _said(capsys).startswith("✅ Exercise 3")


def test_nf4_shift_on_float_indices_is_a_wrong_answer_not_an_unanswered_one(capsys):
    def nf4(w, block_size=64):
        packed, absmax = _nf4(w, block_size)
        return (packed.float() << 4).to(torch.uint8), absmax  # torch: lshift not for Float

    check.nf4_quantize(nf4)
    said = _said(capsys)
    assert said.startswith("❌ Exercise 3") and "integer tensors" in said, said


def _ste(w, bits, mistake=None):
    """A learner's fake quantization with the STE: right by default, or with one usual mistake."""
    qmax = 2**bits - 1 if mistake == "levels" else 2 ** (bits - 1) - 1
    scale = w.abs().max() / qmax if mistake == "scale_gradient" else w.detach().abs().max() / qmax
    if mistake != "nan" and scale == 0:
        scale = torch.tensor(1.0)
    rounded = torch.trunc if mistake == "truncated" else torch.round
    if mistake == "scale_gradient":
        return w + (rounded(w / scale).clamp(-qmax, qmax) * scale - w.detach())
    w_hat = rounded(w.detach() / scale).clamp(-qmax, qmax)
    if mistake != "codes":
        w_hat = w_hat * scale
    if mistake == "no_ste":
        return rounded(w / scale.detach()) * scale.detach()
    if mistake == "detached":
        return w_hat
    return w + (w_hat - w).detach()


def test_ste_model_answer_passes_the_visible_and_the_hidden_kinds_of_cases(capsys):
    check.fake_quantize_ste(_ste)
    said = _said(capsys)
    assert said.startswith("✅ Exercise 4") and "the STE" in said, said
    g = torch.Generator().manual_seed(5)
    cases = [(torch.randn(5, 7, generator=g), 2), (-3 * torch.rand(50, generator=g), 8)]
    cases += [(torch.zeros(6), 4), (torch.randn(3, 4, 5, generator=g), 3)]
    check.fake_quantize_ste(_ste, cases=cases)
    assert _said(capsys) == "✅ Exercise 4: `fake_quantize_ste` passes the grader's further cases."


def test_ste_the_course_function_and_an_autograd_function_pass(capsys):
    class RoundSTE(torch.autograd.Function):
        @staticmethod
        def forward(ctx, w, bits):
            return quant.absmax_decode(*quant.absmax_encode(w, bits))

        @staticmethod
        def backward(ctx, grad):
            return grad, None

    check.fake_quantize_ste(lambda w, bits: quant.fake_quantize(w, bits, w.numel()))
    assert _said(capsys).startswith("✅ Exercise 4")
    check.fake_quantize_ste(lambda w, bits: RoundSTE.apply(w, bits))
    assert _said(capsys).startswith("✅ Exercise 4")


@pytest.mark.parametrize(
    ("mistake", "hint"),
    [
        ("no_ste", "zero almost everywhere"),
        ("detached", "cut off from w"),
        ("scale_gradient", "the scale depends on w too"),
        ("codes", "integer codes"),
        ("levels", "31 levels"),
        ("truncated", "NEAREST"),
    ],
)
def test_ste_mistakes(mistake, hint, capsys):
    check.fake_quantize_ste(lambda w, bits: _ste(w, bits, mistake))
    said = _said(capsys)
    assert said.startswith("❌ Exercise 4") and hint in said, said


def test_ste_unquantized_forward_and_nan_on_zeros_are_named(capsys):
    check.fake_quantize_ste(lambda w, bits: w * 1)
    assert "returns w unchanged" in _said(capsys)
    check.fake_quantize_ste(lambda w, bits: _ste(w, bits, "nan"), cases=[(torch.zeros(6), 4)])
    assert "NaN" in _said(capsys)


def test_ste_in_place_edit_and_stub(capsys):
    def in_place(w, bits):
        with torch.no_grad():
            w.mul_(2)
        return _ste(w, bits)

    check.fake_quantize_ste(in_place)
    assert "in place" in _said(capsys)

    def stub(w, bits):
        # YOUR CODE HERE
        raise NotImplementedError()

    check.fake_quantize_ste(stub)
    assert _said(capsys).startswith("⏳ Exercise 4 is not answered yet: write `fake_quantize_ste`")
