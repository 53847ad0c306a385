"""The LM head fused with the cross-entropy: the logits never exist for the whole batch at once.

A SmolLM2 batch of 8 x 128 tokens has 8 x 128 x 49,152 = 50 M logits, 200 MB in fp32, and
the standard loss keeps three tensors that size (logits, log-probabilities, their gradient):
the largest activation of the whole step (lab 07 measures it). This module computes the loss
a chunk of tokens at a time and, in the same pass, the loss's gradient with respect to the
hidden states (and the head's weight, when it trains), so nothing is recomputed later:

    for each chunk of labelled tokens:   z = h W^T       log p = log_softmax(z)
        loss += -log p[label]            dL/dz = softmax(z) - onehot(label)
        dL/dh = dL/dz W                  dL/dW += (dL/dz)^T h

Two matrix products per chunk (three when W trains), as in the standard loss, and only one
chunk's logits alive. TRL's ``chunked_nll`` holds the same chunk but recomputes it (and its
softmax) in the backward pass; Liger's and Unsloth's fused losses do what this module does, in
GPU kernels. `linear_cross_entropy` is tested against ``torch.nn.functional.cross_entropy``
(loss and gradients) and `patch_lm_head` against the model's own loss. `chunked_cross_entropy`
is the idea without the fused gradient, the function lesson 10 writes, kept here as the plain
reference (lesson 10 and tests/notebooks/test_from_scratch.py check that the two losses agree).

`course_tools.train` uses it for every method (``loss_type="fused"``, the default).
"""

from __future__ import annotations

import inspect
import types
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers.modeling_outputs import CausalLMOutputWithPast

from .data import IGNORE_INDEX  # -100: the label torch's cross-entropy and every HF model skip

__all__ = [
    "CHUNK_TOKENS",
    "LossParts",
    "chunked_cross_entropy",
    "linear_cross_entropy",
    "patch_lm_head",
    "unpatch_lm_head",
]

#: Labelled tokens per chunk: 256 x 49,152 fp32 logits = 48 MB for SmolLM2, plus ROW_BLOCK rows
#: of probabilities. 512 tokens made the two products ~10 % faster on 2 cores, for twice that.
CHUNK_TOKENS = 256
#: Rows of a chunk whose probabilities exist beside its logits: 32 x 49,152 x 4 bytes = 6 MB.
ROW_BLOCK = 32


# The idea, as lesson 10 writes it in its own cell: the same sum as `linear_cross_entropy`, whose
# autograd keeps every chunk's logits for the backward pass; the fused function below forms each
# chunk's gradient in the forward pass instead, so no chunk outlives its loop iteration.
def chunked_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    chunk_tokens: int = CHUNK_TOKENS,
) -> torch.Tensor:
    """The summed loss -log softmax(hidden @ weight.T)[label] over the rows, a chunk at a time.

    hidden is (rows, hidden_size) and labels the (rows,) next tokens, -100 where nothing is
    graded: only chunk_tokens x vocab logits exist at once, never rows x vocab.
    """
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, hidden.shape[0], chunk_tokens):
        logits = (hidden[start : start + chunk_tokens] @ weight.T).float()  # one chunk's logits
        y = labels[start : start + chunk_tokens]
        total = total + F.cross_entropy(logits, y, ignore_index=IGNORE_INDEX, reduction="sum")
    return total


@dataclass
class LossParts:
    """The summed loss and what TRL logs beside it, over the labelled tokens."""

    loss_sum: torch.Tensor  # sum of -log p(label), differentiable
    correct: torch.Tensor  # labelled tokens whose most likely next token is the label
    entropy_sum: torch.Tensor  # sum of the predicted distributions' entropies (nats)
    n_valid: torch.Tensor  # labelled tokens


class _FusedLinearCrossEntropy(torch.autograd.Function):
    """sum(-log softmax(h W^T)[label]) over rows, its gradients formed in the forward pass."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, chunk_tokens):
        """Loss sum, correct count and entropy sum; the gradients are kept for backward."""
        want_h, want_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        compute = torch.promote_types(hidden.dtype, torch.float32)  # fp32, or fp64 for fp64
        grad_h = torch.empty_like(hidden) if want_h else None
        # the first chunk's product writes the head's gradient, the others add to it (no 113 MB
        # fill of zeros for SmolLM2); zeros only when no token is labelled
        grad_w = None
        if want_w:
            grad_w = (torch.empty_like if hidden.shape[0] else torch.zeros_like)(
                weight, dtype=compute
            )
        loss = hidden.new_zeros((), dtype=compute)
        correct = hidden.new_zeros((), dtype=torch.float32)
        entropy = hidden.new_zeros((), dtype=torch.float32)
        # one chunk of logits, reused (a fresh 50 MB tensor per chunk costs page faults), and
        # a few rows of probabilities: the softmax overwrites the logits block by block
        z_buf = hidden.new_empty(
            (min(chunk_tokens, hidden.shape[0]), weight.shape[0]), dtype=compute
        )
        e_buf = z_buf.new_empty((min(ROW_BLOCK, z_buf.shape[0]), weight.shape[0]))
        for start in range(0, hidden.shape[0], chunk_tokens):
            h, y = hidden[start : start + chunk_tokens], labels[start : start + chunk_tokens]
            rows = torch.arange(y.shape[0], device=y.device)
            z = z_buf[: y.shape[0]]
            _matmul_into(z, h, weight.t())  # the logits
            z_max, top = z.max(dim=-1)  # the most likely token comes with the max
            correct += (top == y).sum()
            z.sub_(z_max.unsqueeze(1))
            z_label = z[rows, y]
            for first in range(0, y.shape[0], ROW_BLOCK):
                z_rows = z[first : first + ROW_BLOCK]
                e = e_buf[: z_rows.shape[0]]
                total = torch.exp(z_rows, out=e).sum(dim=-1)  # one exp per logit
                log_total = total.log()
                # -log p(label) = log sum e^z - z[label];  -sum p log p = log sum e^z - sum p z
                loss -= (z_label[first : first + ROW_BLOCK] - log_total).sum()
                z_dot_e = (e.unsqueeze(1) @ z_rows.unsqueeze(2)).view(-1)  # row dot products
                entropy += (log_total - z_dot_e / total).sum()
                if want_h or want_w:
                    torch.div(e, total.unsqueeze(1), out=z_rows)  # these rows: the softmax
            if want_h or want_w:
                z[rows, y] -= 1  # now dL/dz for each row's summed loss
                grad_z = z.to(weight.dtype)
                if want_h:
                    _matmul_into(grad_h[start : start + chunk_tokens], grad_z, weight)
                if want_w:
                    _matmul_into(grad_w, grad_z.t(), h.to(weight.dtype), accumulate=start > 0)
                del grad_z
        ctx.save_for_backward(grad_h, grad_w)
        ctx.weight_dtype = weight.dtype
        ctx.mark_non_differentiable(correct, entropy)
        return loss, correct, entropy

    @staticmethod
    def backward(ctx, grad_loss, _grad_correct, _grad_entropy):
        """Scale the gradients formed in forward by the incoming gradient of the loss sum."""
        grad_h, grad_w = ctx.saved_tensors
        return _scaled(grad_h, grad_loss), _scaled(grad_w, grad_loss, ctx.weight_dtype), None, None


def _scaled(grad, grad_loss, dtype=None) -> torch.Tensor | None:
    """grad * grad_loss in `dtype` (default: grad's), in place where the dtypes allow it."""
    # A fresh copy of SmolLM2's fp32 head gradient costs 113 MB of page faults per step; a
    # second backward pass through the same graph is refused by autograd's saved-tensor check.
    if grad is None:
        return None
    dtype = dtype or grad.dtype
    if grad.dtype == dtype:
        return grad.mul_(grad_loss.to(dtype))
    return (grad * grad_loss).to(dtype)


def _matmul_into(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, accumulate=False) -> None:
    """out = a @ b (out += a @ b with `accumulate`), in place where the dtypes allow it."""
    autocast = torch.is_autocast_enabled(out.device.type)
    if a.dtype == b.dtype == out.dtype and not autocast:
        if accumulate:
            out.addmm_(a, b)
        else:
            torch.mm(a, b, out=out)
    elif accumulate:
        out += a @ b
    else:
        out.copy_(a @ b)


def _check_inputs(hidden, weight, labels, chunk_tokens) -> None:
    """Raise, saying what to pass, unless the shapes and the chunk size fit together."""
    for name, value in (("hidden", hidden), ("weight", weight), ("labels", labels)):
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor (got {type(value).__name__}).")
    if weight.dim() != 2 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"weight must be (vocab, hidden) with hidden = {hidden.shape[-1]} (got "
            f"{tuple(weight.shape)}); pass the LM head's weight, model.lm_head.weight."
        )
    if hidden.shape[:-1] != labels.shape:
        raise ValueError(
            f"labels {tuple(labels.shape)} must match the hidden states' tokens "
            f"{tuple(hidden.shape[:-1])}; shift the labels with the hidden states."
        )
    if labels.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"labels must be integer token ids (got {labels.dtype}).")
    _check_chunk_tokens(chunk_tokens)


def _check_chunk_tokens(chunk_tokens: object) -> None:
    """Raise unless `chunk_tokens` is an integer > 0."""
    if isinstance(chunk_tokens, bool) or not isinstance(chunk_tokens, int) or chunk_tokens <= 0:
        raise ValueError(f"chunk_tokens must be a positive integer (got {chunk_tokens!r}).")


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    chunk_tokens: int = CHUNK_TOKENS,
) -> LossParts:
    """Cross-entropy of ``hidden @ weight.T`` against `labels`, chunk by chunk (-100: skipped).

    `hidden` is (..., hidden_size), `labels` the matching (...) token ids, already aligned with
    the positions that predict them. Returns the loss *summed* over the labelled tokens with
    the counts TRL logs; divide by ``n_valid`` (or the batch's token count) for the mean.
    """
    _check_inputs(hidden, weight, labels, chunk_tokens)
    hidden = hidden.reshape(-1, hidden.shape[-1])
    labels = labels.reshape(-1)
    valid = labels != IGNORE_INDEX
    hidden, labels = hidden[valid], labels[valid].long()
    if labels.numel() and (labels.min() < 0 or labels.max() >= weight.shape[0]):
        raise ValueError(
            f"labels must be token ids in [0, {weight.shape[0]}) or -100 (got "
            f"{labels.min().item()}..{labels.max().item()}); check the tokenizer matches the model."
        )
    loss, correct, entropy = _FusedLinearCrossEntropy.apply(hidden, weight, labels, chunk_tokens)
    return LossParts(loss, correct, entropy, valid.sum())


@dataclass
class FusedLossOutput(CausalLMOutputWithPast):
    """The model output with the loss and TRL's per-token counts; no logits."""

    num_correct_tokens: torch.Tensor | None = None
    entropy_sum: torch.Tensor | None = None
    num_valid_tokens: torch.Tensor | None = None


def _check_plain_head(model) -> None:
    """Raise unless the model's output layer is a bias-free linear head with unscaled logits."""
    head = model.get_output_embeddings()
    if head is None or not isinstance(getattr(head, "weight", None), torch.Tensor):
        raise ValueError("the fused loss needs a causal LM with an lm_head (a linear layer).")
    if type(head) is not torch.nn.Linear or head.bias is not None:
        raise ValueError(
            "the fused loss reads lm_head.weight directly, so the head must be a plain bias-free "
            "nn.Linear (leave lm_head out of LoRA's target_modules, or use loss_type='nll')."
        )
    text_config = model.config.get_text_config()
    scale = getattr(text_config, "logit_scale", None)
    if getattr(text_config, "final_logit_softcapping", None) or scale not in (None, 1, 1.0):
        raise ValueError(
            "this model scales or soft-caps its logits, which the fused loss does not do; "
            "use loss_type='nll'."
        )


def patch_lm_head(model, chunk_tokens: int = CHUNK_TOKENS) -> None:
    """Make `model` (a transformers causal LM) compute its loss with `linear_cross_entropy`.

    A call with ``labels`` runs the decoder, skips the LM head and returns the mean loss with
    ``logits=None`` and the token counts TRL's trainer logs (the contract of TRL's
    ``chunked_nll`` forward). A call without labels (generation) runs the model's own forward.
    For a PEFT model pass ``peft_model.get_base_model()``.
    """
    _check_chunk_tokens(chunk_tokens)
    _check_plain_head(model)
    own_forward = type(model).forward.__get__(model)

    def forward(self, input_ids=None, attention_mask=None, labels=None, **kwargs):
        num_items = kwargs.pop("num_items_in_batch", None)
        shift_labels = kwargs.pop("shift_labels", None)
        if labels is None and shift_labels is None:
            return own_forward(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        kwargs.pop("use_cache", None)
        kwargs.pop("logits_to_keep", None)
        out = self.base_model(
            input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **kwargs
        )
        hidden = out.last_hidden_state
        if shift_labels is None:
            hidden, shift_labels = hidden[:, :-1], labels[:, 1:]
        parts = linear_cross_entropy(
            hidden, self.get_output_embeddings().weight, shift_labels, chunk_tokens=chunk_tokens
        )
        divisor = parts.n_valid.clamp(min=1) if num_items is None else num_items
        if isinstance(divisor, torch.Tensor):
            divisor = divisor.to(parts.loss_sum.device)
        return FusedLossOutput(
            loss=parts.loss_sum / divisor,
            logits=None,
            hidden_states=out.hidden_states,
            num_correct_tokens=parts.correct,
            entropy_sum=parts.entropy_sum,
            num_valid_tokens=parts.n_valid,
        )

    forward.__signature__ = inspect.signature(type(model).forward)
    forward.fused_loss = True
    model.forward = types.MethodType(forward, model)


def unpatch_lm_head(model) -> None:
    """Give `model` back its own forward if `patch_lm_head` replaced it (else do nothing)."""
    if getattr(vars(model).get("forward"), "fused_loss", False):
        del model.forward
