"""Tests for the LoRA explorers in course_utils.widgets: the numbers, the text, the wiring."""

import html
import math

import numpy as np
import pytest
import torch

from course_utils.lora import first_step_update_norm
from course_utils.spectrum import reconstruction_error
from course_utils.widgets import (
    ALPHA_STATS_CLASS,
    RANK_STATS_CLASS,
    alpha_explorer,
    alpha_stats,
    format_alpha_stats,
    format_rank_stats,
    rank_explorer,
    rank_stats,
)


@pytest.fixture(scope="module")
def delta() -> torch.Tensor:
    """A 48 x 32 float32 'ΔW' with a decaying spectrum."""
    g = torch.Generator().manual_seed(0)
    u, _ = torch.linalg.qr(torch.randn(48, 32, generator=g))
    v, _ = torch.linalg.qr(torch.randn(32, 32, generator=g))
    return (u * 0.8 ** torch.arange(32.0)) @ v.T * 0.01


# -----------------------------------------------------------------------------
# rank_stats / format_rank_stats


@pytest.mark.parametrize("r", [1, 5, 32])
def test_rank_stats_match_direct_computation(delta, r):
    stats = rank_stats(delta, r)
    sigmas = np.linalg.svd(delta.double().numpy(), compute_uv=False)
    assert stats["r"] == r and stats["shape"] == (48, 32)
    assert stats["energy_captured"] == pytest.approx((sigmas[:r] ** 2).sum() / (sigmas**2).sum())
    # The error comes from the singular values; check it against an explicit reconstruction.
    assert stats["reconstruction_error"] == pytest.approx(
        reconstruction_error(delta, r, relative=True), abs=1e-9
    )
    assert stats["absolute_error"] == pytest.approx(reconstruction_error(delta, r), abs=1e-9)
    assert stats["lora_parameters"] == r * (48 + 32)
    assert stats["full_parameters"] == 48 * 32


def test_format_rank_stats_exact_text():
    delta = torch.zeros(3, 4)
    delta[0, 0], delta[1, 1], delta[2, 2] = 3.0, 2.0, 1.0  # σ = 3, 2, 1; Σσ² = 14
    text = format_rank_stats(rank_stats(delta, 1))
    # error sqrt(5/14) = 0.59761; energy 9/14 = 64.2857 %; LoRA 1 x (3 + 4) = 7
    assert text == (
        "rank r = 1 · reconstruction error = 0.5976 · energy captured = 64.29 % · "
        "LoRA parameters = 7"
    )
    big = {"r": 64, "reconstruction_error": 0.0, "energy_captured": 1.0, "lora_parameters": 73728}
    assert format_rank_stats(big).endswith("energy captured = 100.00 % · LoRA parameters = 73,728")


@pytest.mark.parametrize(
    ("r", "error", "match"),
    [
        (0, ValueError, r"r must be between 1 and 32.*48 x 32 matrix.*e\.g\. r=8"),
        (-3, ValueError, "r must be between 1 and 32"),
        (33, ValueError, "r must be between 1 and 32"),
        (2.5, TypeError, "r must be an integer"),
    ],
)
def test_rank_stats_rejects_bad_rank(delta, r, error, match):
    with pytest.raises(error, match=match):
        rank_stats(delta, r)


def test_rank_stats_rejects_bad_matrices():
    with pytest.raises(ValueError, match="all zeros"):
        rank_stats(torch.zeros(4, 4), 1)
    with pytest.raises(ValueError, match="2-D matrix"):
        rank_stats(torch.ones(4), 1)
    with pytest.raises(ValueError, match="stats lacks.*rank_stats"):
        format_rank_stats({"r": 1})
    with pytest.raises(TypeError, match="stats must be the dict rank_stats"):
        format_rank_stats("rank 8")


# -----------------------------------------------------------------------------
# alpha_stats / format_alpha_stats


@pytest.mark.parametrize(("r", "alpha", "rslora"), [(8, 16, False), (8, 16, True), (1, 1, False)])
def test_alpha_stats_match_direct_computation(r, alpha, rslora):
    stats = alpha_stats(r, alpha, rslora)
    expected_scale = alpha / math.sqrt(r) if rslora else alpha / r
    assert stats["scale"] == pytest.approx(expected_scale, rel=1e-12)
    assert stats["update_norm"] == first_step_update_norm(r, alpha, rslora)
    assert stats["rule"] == ("α/√r" if rslora else "α/r")
    assert (stats["r"], stats["alpha"], stats["rslora"]) == (r, alpha, rslora)


def test_alpha_stats_doubling_r_halves_the_scale_but_not_with_rslora():
    assert alpha_stats(16, 16)["scale"] == alpha_stats(8, 16)["scale"] / 2
    assert alpha_stats(32, 16, True)["scale"] == pytest.approx(
        alpha_stats(8, 16, True)["scale"] / 2
    )


def test_format_alpha_stats_exact_text():
    stats = {"r": 8, "alpha": 16, "rule": "α/r", "scale": 2.0, "update_norm": 79.68641}
    assert format_alpha_stats(stats) == (
        "rank r = 8 · alpha α = 16 · rule = α/r · effective scale = 2.0000 · "
        "update norm = 79.6864 × lr"
    )
    text = format_alpha_stats(alpha_stats(4, 8, True))
    assert text.startswith("rank r = 4 · alpha α = 8 · rule = α/√r · effective scale = 4.0000 · ")


@pytest.mark.parametrize(
    ("args", "error", "match"),
    [
        ((0, 16, False), ValueError, "r must be between 1 and 576"),
        ((-1, 16, False), ValueError, "r must be between 1 and 576"),
        ((577, 16, False), ValueError, "r must be between 1 and 576"),
        ((8, 0, False), ValueError, "alpha must be a positive number.*try alpha=2\\*r"),
        ((8, -4, False), ValueError, "alpha must be a positive number"),
        ((8, 16, "yes"), TypeError, "rslora must be True or False"),
        ((8.0, 16, False), TypeError, "r must be an integer"),
    ],
)
def test_alpha_stats_rejects_bad_input(args, error, match):
    with pytest.raises(error, match=match):
        alpha_stats(*args)


# -----------------------------------------------------------------------------
# The widgets: what they show is what the functions return, after every change


def test_rank_explorer_shows_format_rank_stats_and_follows_the_slider(delta):
    box = rank_explorer(delta, r=4)
    slider, text, plot = box.children
    assert slider is box.slider and text is box.stats_html and plot is box.plot
    assert slider.description == "rank r" and (slider.min, slider.max) == (1, 32)
    assert RANK_STATS_CLASS in text._dom_classes
    assert text.value == html.escape(format_rank_stats(rank_stats(delta, 4)))
    for new_r in (5, 6, 31, 1):
        slider.value = new_r
        assert text.value == html.escape(format_rank_stats(rank_stats(delta, new_r)))
        assert box.stats == rank_stats(delta, new_r)
        assert "image/png" in plot.outputs[0]["data"]
    assert html.unescape(text.value) == format_rank_stats(rank_stats(delta, 1))  # plain text


def test_rank_explorer_limits(delta):
    assert rank_explorer(delta, max_rank=10).slider.max == 10
    with pytest.raises(ValueError, match="r must be between 1 and 32"):
        rank_explorer(delta, r=0)
    with pytest.raises(ValueError, match="above max_rank"):
        rank_explorer(delta, r=12, max_rank=10)
    with pytest.raises(ValueError, match="max_rank must be an integer between 1 and 32"):
        rank_explorer(delta, max_rank=40)


def test_alpha_explorer_shows_format_alpha_stats_and_follows_every_control():
    box = alpha_explorer(r=4, alpha=8, max_rank=16, max_alpha=32)
    r_slider, alpha_slider, rs_box, text, plot = box.children
    assert box.controls == {"r": r_slider, "alpha": alpha_slider, "rslora": rs_box}
    assert (r_slider.description, alpha_slider.description, rs_box.description) == (
        "rank r",
        "alpha α",
        "rsLoRA",
    )
    assert ALPHA_STATS_CLASS in text._dom_classes
    assert text.value == html.escape(format_alpha_stats(alpha_stats(4, 8, False)))
    r_slider.value = 16
    assert text.value == html.escape(format_alpha_stats(alpha_stats(16, 8, False)))
    alpha_slider.value = 32
    assert text.value == html.escape(format_alpha_stats(alpha_stats(16, 32, False)))
    rs_box.value = True
    assert text.value == html.escape(format_alpha_stats(alpha_stats(16, 32, True)))
    assert box.stats["scale"] == 8.0
    assert "image/png" in plot.outputs[0]["data"]


def test_alpha_explorer_rejects_bad_settings():
    with pytest.raises(ValueError, match="alpha must be a positive number"):
        alpha_explorer(alpha=0)
    with pytest.raises(ValueError, match="must not exceed max_rank"):
        alpha_explorer(r=64, max_rank=32)
