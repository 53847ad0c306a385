"""The fused LM head + cross-entropy against torch's cross-entropy and the model's own loss."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from course_utils import assets, fused_loss
from course_utils.peak_memory import PeakMemory


def _inputs(n=300, hidden=32, vocab=1000, dtype=torch.float64, seed=0):
    """Random hidden states, a head weight and labels with some -100s, all requiring grad."""
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(n, hidden, dtype=dtype, generator=gen).requires_grad_()
    w = (torch.randn(vocab, hidden, dtype=dtype, generator=gen) / 4).requires_grad_()
    y = torch.randint(0, vocab, (n,), generator=gen)
    y[::7] = fused_loss.IGNORE_INDEX
    return h, w, y


@pytest.mark.parametrize("chunk_tokens", [1, 64, 257, 10_000])
def test_loss_and_gradients_equal_torch_cross_entropy(chunk_tokens):
    h, w, y = _inputs()
    ref = F.cross_entropy(h @ w.t(), y, reduction="sum")
    ref_h, ref_w = torch.autograd.grad(3 * ref, (h, w))
    parts = fused_loss.linear_cross_entropy(h, w, y, chunk_tokens=chunk_tokens)
    got_h, got_w = torch.autograd.grad(3 * parts.loss_sum, (h, w))
    torch.testing.assert_close(parts.loss_sum, ref)
    torch.testing.assert_close(got_h, ref_h)
    torch.testing.assert_close(got_w, ref_w)


def test_no_labelled_token_gives_zero_gradients():
    h, w, y = _inputs()
    y[:] = fused_loss.IGNORE_INDEX
    got_h, got_w = torch.autograd.grad(fused_loss.linear_cross_entropy(h, w, y).loss_sum, (h, w))
    assert not got_h.any() and not got_w.any()


def test_a_second_backward_pass_is_refused_not_scaled_twice():
    # backward scales the gradients kept from the forward pass in place
    h, w, y = _inputs()
    loss = fused_loss.linear_cross_entropy(h, w, y).loss_sum
    torch.autograd.grad(2 * loss, (h, w), retain_graph=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        torch.autograd.grad(2 * loss, (h, w))


def test_counts_are_what_trl_logs():
    h, w, y = _inputs()
    parts = fused_loss.linear_cross_entropy(h, w, y, chunk_tokens=50)
    valid = y != fused_loss.IGNORE_INDEX
    logits = (h @ w.t())[valid].detach()
    log_p = logits.log_softmax(-1)
    assert parts.n_valid == valid.sum()
    assert parts.correct == (logits.argmax(-1) == y[valid]).sum()
    torch.testing.assert_close(parts.entropy_sum.double(), -(log_p.exp() * log_p).sum())


def test_only_what_requires_grad_gets_a_gradient():
    h, w, y = _inputs()
    w.requires_grad_(False)  # a frozen head: LoRA
    parts = fused_loss.linear_cross_entropy(h, w, y)
    (grad_h,) = torch.autograd.grad(parts.loss_sum, h)
    ref_h = torch.autograd.grad(F.cross_entropy(h @ w.t(), y, reduction="sum"), h)[0]
    torch.testing.assert_close(grad_h, ref_h)
    with torch.no_grad():  # evaluation: the loss alone
        torch.testing.assert_close(
            fused_loss.linear_cross_entropy(h, w, y).loss_sum, parts.loss_sum
        )


def test_bf16_and_autocast_give_fp32_losses_close_to_the_reference():
    h, w, y = _inputs(dtype=torch.float32)
    ref = F.cross_entropy(h @ w.t(), y, reduction="sum")
    low = fused_loss.linear_cross_entropy(h.bfloat16(), w.bfloat16(), y).loss_sum
    with torch.autocast("cpu", dtype=torch.bfloat16):
        auto = fused_loss.linear_cross_entropy(h, w, y)
    auto_h, auto_w = torch.autograd.grad(auto.loss_sum, (h, w))
    assert low.dtype == auto.loss_sum.dtype == torch.float32
    assert low.item() == pytest.approx(ref.item(), rel=1e-2)
    assert auto.loss_sum.item() == pytest.approx(ref.item(), rel=1e-2)
    assert auto_h.dtype == h.dtype and auto_w.dtype == w.dtype


def test_bad_input_says_what_to_pass():
    h, w, y = _inputs()
    with pytest.raises(ValueError, match="model.lm_head.weight"):
        fused_loss.linear_cross_entropy(h, w.t(), y)
    with pytest.raises(ValueError, match="shift the labels"):
        fused_loss.linear_cross_entropy(h, w, y[1:])
    with pytest.raises(TypeError, match="integer token ids"):
        fused_loss.linear_cross_entropy(h, w, y.double())
    with pytest.raises(ValueError, match="chunk_tokens must be a positive integer"):
        fused_loss.linear_cross_entropy(h, w, y, chunk_tokens=0)
    with pytest.raises(ValueError, match=r"token ids in \[0, 1000\)"):
        fused_loss.linear_cross_entropy(h, w, y + 1000)
    with pytest.raises(TypeError, match="must be a torch.Tensor"):
        fused_loss.linear_cross_entropy(h, w.tolist(), y)


def _batch(vocab):
    """Two sequences whose first tokens are prompt (-100)."""
    ids = torch.randint(0, vocab, (2, 12), generator=torch.Generator().manual_seed(1))
    labels = ids.clone()
    labels[:, :4] = fused_loss.IGNORE_INDEX
    return ids, labels


def test_a_patched_model_gives_its_own_loss_and_gradients(tokenizer):
    model = assets.tiny_llama(tokenizer)  # tied embeddings: the head's weight trains
    ids, labels = _batch(model.config.vocab_size)
    params = list(model.parameters())
    ref = model(input_ids=ids, labels=labels)
    ref_grads = torch.autograd.grad(ref.loss, params)
    fused_loss.patch_lm_head(model, chunk_tokens=5)
    out = model(input_ids=ids, labels=labels)
    grads = torch.autograd.grad(out.loss, params)
    assert out.logits is None and int(out.num_valid_tokens) == 2 * 8
    torch.testing.assert_close(out.loss, ref.loss)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(model(input_ids=ids).logits, ref.logits)  # no labels: own forward
    fused_loss.unpatch_lm_head(model)
    assert model(input_ids=ids, labels=labels).logits is not None


def test_a_head_it_cannot_read_is_refused(tokenizer):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(
        assets.tiny_llama(tokenizer), LoraConfig(r=2, target_modules=["q_proj", "lm_head"])
    )
    with pytest.raises(ValueError, match="leave lm_head out of LoRA's target_modules"):
        fused_loss.patch_lm_head(model.get_base_model())
    with pytest.raises(ValueError, match="chunk_tokens must be a positive integer"):
        fused_loss.patch_lm_head(assets.tiny_llama(tokenizer), chunk_tokens=True)


def test_it_holds_one_chunk_of_logits_not_all_of_them():
    """The lesson's memory claim, measured: 4 bytes per logit of one chunk, not 12 of all."""
    tokens, hidden, vocab, chunk = 2048, 64, 8192, 256
    gen = torch.Generator().manual_seed(0)
    h = torch.randn(tokens, hidden, generator=gen).requires_grad_()
    w = torch.randn(vocab, hidden, generator=gen) / 8
    y = torch.randint(0, vocab, (tokens,), generator=gen)
    peaks = {}
    for name in ("fused", "standard"):
        with PeakMemory() as peak:
            if name == "fused":
                loss = fused_loss.linear_cross_entropy(h, w, y, chunk_tokens=chunk).loss_sum
            else:
                loss = F.cross_entropy(h @ w.t(), y, reduction="sum")
            loss.backward()
        peaks[name] = peak.peak
    one_chunk = chunk * vocab * 4
    assert peaks["fused"] <= 1.5 * one_chunk  # one chunk, its softmax written over it
    assert peaks["standard"] >= 2 * tokens * vocab * 4  # all the logits, twice over
