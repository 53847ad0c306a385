"""Tests for course_tools.bench.loss: the three losses raced alone, on small tensors."""

import json

import pytest
import torch

from course_tools.bench import loss as bench_loss
from course_utils import fused_loss


def _inputs(batch=2, seq_len=300, hidden=32, vocab=1000, seed=0):
    """Hidden states, a head weight and labels (some -100) shaped like a model's batch."""
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(batch, seq_len, hidden, generator=gen)
    w = torch.randn(vocab, hidden, generator=gen) / 4
    y = torch.randint(0, vocab, (batch, seq_len), generator=gen)
    y[:, ::5] = fused_loss.IGNORE_INDEX
    return h, w, y


def test_the_three_losses_agree_and_a_wrong_one_stops_the_bench(monkeypatch):
    h, w, y = _inputs()
    gaps = bench_loss.check_agreement(h, w, y)
    assert set(gaps) == {"chunked_nll", "fused"} and max(gaps.values()) < 1e-4
    right = bench_loss.LOSS_FUNCTIONS["fused"]
    monkeypatch.setitem(bench_loss.LOSS_FUNCTIONS, "fused", lambda *a: right(*a) * 1.001)
    with pytest.raises(AssertionError, match="fused loss differs from the standard one"):
        bench_loss.check_agreement(h, w, y)


def test_the_race_times_every_loss_and_the_fused_one_holds_one_chunk():
    h, w, y = _inputs()
    rows = bench_loss.race(h, w, y, rounds=2)
    assert [(row["head"], row["loss"]) for row in rows] == [
        (head, loss) for head in bench_loss.HEADS for loss in bench_loss.LOSSES
    ]
    for row in rows:
        assert len(row["seconds"]) == 2 and row["min_s"] <= row["median_s"]
        assert row["speedup"] == pytest.approx(
            next(
                r["median_s"] for r in rows if r["head"] == row["head"] and r["loss"] == "standard"
            )
            / row["median_s"]
        )
    peaks = {(row["head"], row["loss"]): row["peak_mb"] for row in rows}
    all_logits_mb = 2 * 300 * 1000 * 4 / 2**20  # every token's fp32 logits
    chunk_mb = fused_loss.CHUNK_TOKENS * 1000 * 8 / 2**20  # one chunk, two buffers
    assert peaks["frozen", "standard"] >= 2 * all_logits_mb
    assert peaks["frozen", "fused"] <= 1.2 * chunk_mb + h.numel() * 4 / 2**20


def test_run_writes_the_table_on_the_tiny_model(tmp_path):
    rows = bench_loss.run(tmp_path, model="tiny", batch=2, seq_len=32, rounds=1)
    table = (tmp_path / "loss.md").read_text()
    saved = json.loads((tmp_path / "loss.json").read_text())
    assert len(rows) == len(saved["rows"]) == 6
    assert saved["info"]["vocab"] == 49152 and saved["info"]["batch"] == 2
    for row in rows:
        assert f"| {row['head']} | {row['loss']} | {row['median_s']:.3f} |" in table


def test_bad_input_says_what_to_pass(tmp_path):
    h, w, y = _inputs(seq_len=8)
    with pytest.raises(ValueError, match="rounds must be a positive integer"):
        bench_loss.race(h, w, y, rounds=0)
    with pytest.raises(ValueError, match="head must be one of"):
        bench_loss.race(h, w, y, heads=["lora"])
    with pytest.raises(ValueError, match="batch must be a positive integer"):
        bench_loss.run(tmp_path, batch=True)
    with pytest.raises(ValueError, match="model must be one of"):
        bench_loss.run(tmp_path, model="gpt2")
