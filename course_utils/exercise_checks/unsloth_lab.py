"""Checks for the exercises of lesson 10 (Unsloth lab): logits bytes, chunked loss and gradient.

The checks build what they compare with themselves: a model of the config on the meta device
(exercise 1), the tiny random Llama of the exercise notebook with SmolLM2's vocabulary on the
lab's batches or on random batches (exercises 2 and 3), transformers' own loss and autograd.
`small_model` and `random_batch` build the other shapes the hidden tests use.
"""

from __future__ import annotations

import contextlib
import functools
from unittest import mock

import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.loss.loss_utils import ForCausalLMLoss

from course_utils import assets, data, memory
from course_utils.exercise_checks.feedback import Wrong, allclose, equal, exercise, expect

IGNORE = data.IGNORE_INDEX


# Exercise 1: the bytes of the logits a loss holds at once.


def _meta_model(config, dtype=torch.float32):
    """The Llama-style model of `config` on the meta device: every shape, no memory."""
    with torch.device("meta"):
        return LlamaForCausalLM(LlamaConfig(**memory.get_config(config))).to(dtype)


def _measured_bytes(config, batch, seq_len, chunk_rows=None, dtype=torch.float32) -> int:
    """Bytes of the fp32 logits (or of the largest chunk of them) the model of config computes."""
    cfg = dict(memory.get_config(config), num_hidden_layers=1)  # the logits do not need depth
    model = _meta_model(cfg, dtype=dtype)
    ids = torch.zeros(batch, seq_len, dtype=torch.long, device="meta")
    with torch.no_grad():
        if chunk_rows is None:
            logits = model(input_ids=ids).logits.float()  # what ForCausalLMLoss reads
            return logits.nelement() * logits.element_size()
        hidden = model.model(input_ids=ids).last_hidden_state
        rows = hidden.reshape(-1, hidden.shape[-1])
        weight = model.lm_head.weight
        blocks = [
            (rows[start : start + chunk_rows] @ weight.T).float()
            for start in range(0, len(rows), chunk_rows)
        ]
    return max(block.nelement() * block.element_size() for block in blocks)


def _bytes_hint(config, batch, seq_len, chunk_rows, got, expected) -> str:
    """The hint for a wrong number of bytes: the mistake it looks like, if one fits."""
    cfg = memory.get_config(config)
    vocab, rows = cfg["vocab_size"], batch * seq_len
    held = rows if chunk_rows is None else min(rows, chunk_rows)
    one_row_per_position = "a block has one row per position: every position of every row."
    wrong = [
        (held * vocab, "that is the number of logits: each fp32 value takes 4 bytes."),
        (2 * held * vocab, "the loss upcasts the logits to fp32: 4 bytes each, even in bf16."),
        (12 * held * vocab, "that is memory.estimate's three tensors: count the logits alone."),
        (4 * held * cfg["hidden_size"], "one logit per vocabulary entry: use vocab_size."),
        (4 * batch * vocab, one_row_per_position),
        (4 * seq_len * vocab, one_row_per_position),
    ]
    if chunk_rows is None:
        wrong.append(
            (
                4 * batch * (seq_len - 1) * vocab,
                "the model computes logits at all seq_len positions; the loss shifts the labels.",
            )
        )
    else:
        wrong += [
            (4 * rows * vocab, "with chunk_rows, only chunk_rows rows of logits exist at once."),
            (
                4 * chunk_rows * vocab,
                "a block cannot hold more rows than the batch has positions.",
            ),
            (
                4 * (rows % chunk_rows) * vocab,
                "the largest block is a full one of chunk_rows rows, not the last, shorter one.",
            ),
        ]
    for value, text in wrong:
        if got == value != expected:
            return text
    return (
        "count the rows held at once (all the positions, or at most chunk_rows of them), "
        "one fp32 logit per vocabulary entry in each."
    )


def _check_logits_bytes(logits_bytes, config, batch, seq_len, chunk_rows, dtype) -> int:
    """Compare logits_bytes with the tensors a real model computes; explain a mismatch."""
    got = logits_bytes(config, batch, seq_len, chunk_rows=chunk_rows)
    call = f"logits_bytes({str(config)[:30]!r}, {batch}, {seq_len}, chunk_rows={chunk_rows})"
    expect(
        isinstance(got, int) and not isinstance(got, bool),
        f"{call} returned {type(got).__name__}, not an int. Hint: bytes are whole: multiply ints.",
    )
    expected = _measured_bytes(config, batch, seq_len, chunk_rows, dtype)
    expect(
        got == expected,
        f"{call} is {got:,} bytes, but the model computes {expected:,} bytes of fp32 logits "
        f"at once. Hint: {_bytes_hint(config, batch, seq_len, chunk_rows, got, expected)}",
    )
    return got


#: (config, batch, seq_len, chunk_rows, dtype of the model) of the visible test.
LOGITS_BYTES_CASES = [
    ("SmolLM2-135M", 8, 512, None, torch.float32),
    ("SmolLM2-135M", 8, 512, None, torch.bfloat16),
    ("SmolLM2-135M", 8, 512, 341, torch.float32),
    ("SmolLM2-135M", 2, 100, 341, torch.float32),
]


@exercise(1, "logits_bytes")
def logits_bytes(logits_bytes, cases=LOGITS_BYTES_CASES) -> str:
    """Exercise 1: logits_bytes against the logits of a model of the config on the meta device.

    Reports the full logits and Unsloth's chunk for SmolLM2 and Llama-3.2-1B, next to the
    activations `memory.estimate` predicts.
    """
    for config, batch, seq_len, chunk_rows, dtype in cases:
        _check_logits_bytes(logits_bytes, config, batch, seq_len, chunk_rows, dtype)
    lines = []
    for name, batch, seq in (("SmolLM2-135M", 8, 512), ("Llama-3.2-1B", 8, 2048)):
        chunk = max(16, 16 * 2**20 // memory.get_config(name)["vocab_size"])
        full = logits_bytes(name, batch, seq)
        estimate = memory.estimate(name, method="lora", dtype="bf16", batch=batch, seq_len=seq)
        lines.append(
            f"{name}, batch {batch} x {seq}: full logits {full / 2**20:,.0f} MB "
            f"(x 3 = {3 * full / memory.GB:.1f} GB of the {estimate.activations / memory.GB:.1f} "
            f"GB of activations memory.estimate predicts for LoRA); a chunk of {chunk} rows: "
            f"{logits_bytes(name, batch, seq, chunk) / 2**20:.0f} MB"
        )
    return "\n".join(lines)


# The models and batches of exercises 2 and 3.


@functools.cache
def _tokenizer():
    """The course tokenizer, loaded once."""
    return assets.load_tokenizer()


def _tiny_model(seed=0, **shape):
    """The notebook's tiny_model: a random tiny Llama with the course tokenizer's vocabulary."""
    return assets.tiny_llama(_tokenizer(), seed=seed, **shape).eval()


def small_model(seed, vocab=1000, hidden_size=32):
    """A tiny Llama with a small vocabulary, for fast checks of other shapes."""
    return _tiny_model(seed, vocab_size=vocab, hidden_size=hidden_size)


def random_batch(seed, lengths, vocab=1000, padding_side="right"):
    """Random token rows of these lengths, a random prompt masked in each, padded by data.pad_batch."""
    g = torch.Generator().manual_seed(seed)
    features = []
    for length in lengths:
        ids = torch.randint(vocab, (length,), generator=g).tolist()
        prompt = int(torch.randint(length - 1, (1,), generator=g))
        features.append({"input_ids": ids, "labels": [IGNORE] * prompt + ids[prompt:]})
    return data.pad_batch(features, _tokenizer().pad_token_id, padding_side=padding_side)


def _lab_batch(n=2):
    """The notebook's chat_batch(n): the lab's first training examples, assistant-only labels."""
    examples = data.load_instruction_task("train")[:n]
    features = [data.tokenize_with_assistant_mask(_tokenizer(), example) for example in examples]
    return data.pad_batch(features, _tokenizer().pad_token_id)


def _lm_head_inputs(model, batch):
    """(hidden, weight, labels): the final hidden states, the LM head's weight and the labels."""
    with torch.no_grad():
        hidden = model.model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
        ).last_hidden_state
    return hidden, model.lm_head.weight.detach(), batch["labels"]


def _shares_memory(a, b) -> bool:
    """Whether two tensors are views of the same memory."""
    return (
        a.device.type != "meta" and a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()
    )


class _LogitsWatch(torch.overrides.TorchFunctionMode):
    """Records in .rows the most rows of any (..., vocab) tensor torch computes inside the block."""

    def __init__(self, weight):
        super().__init__()
        self.weight, self.rows = weight, 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        for tensor in result if isinstance(result, tuple | list) else (result,):
            if (
                isinstance(tensor, torch.Tensor)
                and tensor.dim() > 0
                and tensor.shape[-1] == self.weight.shape[0]
                and not _shares_memory(tensor, self.weight)  # weight.T, a view of the weight
            ):
                self.rows = max(self.rows, tensor.numel() // tensor.shape[-1])
        return result


def _full_logits(hidden, weight):
    """All the logits at once, in fp32, as the model's own loss computes them."""
    return (hidden @ weight.T).float()


# Exercise 2: the loss, chunk by chunk.


def _nll_mistakes(hidden, weight, labels, chunk_rows):
    """Typical wrong losses, computed from the full logits, each with its hint."""
    logits = _full_logits(hidden, weight)
    vocab = logits.shape[-1]
    shifted = F.cross_entropy(logits[:, :-1].reshape(-1, vocab), labels[:, 1:].reshape(-1))
    counted = int((labels[:, 1:] != IGNORE).sum())
    flat_targets = torch.full_like(labels, IGNORE)
    flat_targets[:, :-1] = labels[:, 1:]
    flat_targets, flat_logits = flat_targets.reshape(-1), logits.reshape(-1, vocab)
    losses = F.cross_entropy(flat_logits, flat_targets, ignore_index=IGNORE, reduction="none")
    means = [
        losses[s : s + chunk_rows].sum() / (flat_targets[s : s + chunk_rows] != IGNORE).sum()
        for s in range(0, len(losses), chunk_rows)
        if (flat_targets[s : s + chunk_rows] != IGNORE).any()
    ]
    not_all = "divide by n, the number of counted positions (next label not -100), not by all."
    return [
        (
            F.cross_entropy(logits.reshape(-1, vocab), labels.reshape(-1)),
            "shift the labels: the logits at position t are scored against labels[:, t + 1].",
        ),
        (
            F.cross_entropy(logits[:, 1:].reshape(-1, vocab), labels[:, :-1].reshape(-1)),
            "position t predicts the NEXT token, labels[:, t + 1], not the one before it.",
        ),
        (
            F.cross_entropy(logits.reshape(-1, vocab)[:-1], labels.reshape(-1)[1:]),
            "shift inside each row: a row's last position does not predict the next row's start.",
        ),
        (
            torch.stack(means).mean(),
            "that is the mean of the chunks' means: add up the losses of all chunks, then "
            "divide once by the number of counted positions.",
        ),
        (shifted * counted, "that is the sum: divide by n, the number of counted positions."),
        (shifted * counted / labels.numel(), not_all),
        (shifted * counted / labels[:, 1:].numel(), not_all),
    ]


def _check_nll(chunked_nll, model, batch, chunk_rows) -> tuple[float, float, int]:
    """Compare chunked_nll with the model's own loss; watch the blocks; explain a mismatch.

    Returns (your loss, the model's loss, the most rows of logits held at once).
    """
    hidden, weight, labels = _lm_head_inputs(model, batch)
    with torch.no_grad():
        own_loss = model(**batch).loss
    inputs = (hidden.clone(), weight.clone(), labels.clone())
    with _LogitsWatch(weight) as watch, torch.no_grad():
        got = chunked_nll(hidden, weight, labels, chunk_rows)
    expect(
        all(equal(a, b) for a, b in zip(inputs, (hidden, weight, labels), strict=True)),
        "chunked_nll changed its inputs. Hint: shift a copy of the labels, not the labels.",
    )
    expect(
        isinstance(got, torch.Tensor) and got.dim() == 0,
        f"chunked_nll returned {type(got).__name__} "
        f"{tuple(got.shape) if isinstance(got, torch.Tensor) else ''}. "
        "Hint: return the loss as a 0-dim tensor: the summed losses / n.",
    )
    expect(
        watch.rows <= chunk_rows,
        f"chunked_nll computed a block of {watch.rows} rows of logits at once, with "
        f"chunk_rows={chunk_rows} ({labels.numel()} positions). Hint: multiply hidden by "
        "weight.T one chunk of at most chunk_rows positions at a time, never all of them.",
    )
    if allclose(got.float(), own_loss, rtol=1e-5, atol=1e-6):
        return float(got), float(own_loss), watch.rows
    if got.isnan():
        hint = (
            "a chunk without a counted position has no mean (reduction='mean' gives NaN): "
            "sum each chunk's losses (reduction='sum', ignore_index=-100) and divide once by n."
        )
    else:
        hint = "sum -log softmax(z_t)[y_t] over the counted positions of all chunks, divide by n."
        for wrong, text in _nll_mistakes(hidden, weight, labels, chunk_rows):
            if allclose(got.float(), wrong, rtol=1e-5, atol=1e-6):
                hint = text
                break
    expect(
        False,
        f"chunked_nll(..., chunk_rows={chunk_rows}) is {float(got):.6f}, but the model's loss is "
        f"{float(own_loss):.6f}. Hint: {hint}",
    )
    return float(got), float(own_loss), watch.rows  # not reached


#: The chunk sizes of the visible test on the lab's batch: the first block of 64 holds only
#: prompt; 45 leaves a remainder.
LAB_CHUNKS = (64, 45)


def _visible_nll_cases():
    """The visible test: the lab's batch and a random batch of three rows, as (model, batch, chunk)."""
    lab, lab_batch = _tiny_model(), _lab_batch(2)
    small, small_batch = small_model(seed=1), random_batch(0, [20, 13, 17])
    return [(lab, lab_batch, chunk) for chunk in LAB_CHUNKS] + [
        (small, small_batch, chunk)
        for chunk in (7, 1000)  # 1000: more than all the rows
    ]


@exercise(2, "chunked_nll")
def chunked_nll(chunked_nll, cases=None) -> str | None:
    """Exercise 2: chunked_nll against the model's own loss, no block larger than chunk_rows.

    `cases` is a list of (model, batch, chunk_rows): the check compares with `model(**batch).loss`
    on the hidden states, LM head weight and labels of that batch; without it, the visible test
    (the lab's batch with chunks of 64 and 45 rows, reported, and a random batch).
    """
    visible = cases is None
    if visible:
        cases = _visible_nll_cases()
    results = [_check_nll(chunked_nll, *case) for case in cases]
    if not visible:
        return None
    lab, lab_batch, _ = cases[0]
    rows = int(lab_batch["labels"].numel())
    mb = lab.lm_head.weight.shape[0] * 4 / 2**20
    return "\n".join(
        f"chunk_rows={chunk:>4}: loss {loss:.6f} (the model's: {own:.6f}); largest "
        f"block {held:>3} rows = {held * mb:4.1f} MB of fp32 logits, not {rows * mb:.1f} MB"
        for chunk, (loss, own, held) in zip(LAB_CHUNKS, results, strict=False)
    )


# Exercise 3: the gradient without the logits.


def _refuse_autograd(*args, **kwargs):
    raise Wrong(
        "chunked_nll_backward called autograd. Hint: compute the gradient by hand from its "
        "closed form (softmax minus one-hot, times the weight, over n), chunk by chunk."
    )


def _no_autograd():
    """A context in which backward() and torch.autograd.grad raise."""
    stack = contextlib.ExitStack()
    for name in ("backward", "grad"):
        stack.enter_context(mock.patch(f"torch.autograd.{name}", _refuse_autograd))
    return stack


def _autograd(hidden, weight, labels):
    """(loss, d loss / d hidden) from autograd through transformers' ForCausalLMLoss."""
    h = hidden.detach().clone().requires_grad_()
    loss = ForCausalLMLoss(h @ weight.T, labels, vocab_size=weight.shape[0])
    loss.backward()
    return loss.detach(), h.grad


def _grad_mistakes(hidden, weight, labels):
    """Typical wrong gradients, from the full logits, each with its hint."""
    rows = hidden.reshape(-1, hidden.shape[-1])
    logits = (rows @ weight.T).float()
    p = torch.softmax(logits, dim=-1)

    def grad(targets, subtract=True, divide=True, zero_ignored=True):
        counted = targets != IGNORE
        safe = torch.where(counted, targets, 0)
        block = p - F.one_hot(safe, p.shape[-1]) * subtract
        if zero_ignored:
            block = block * counted[:, None]
        g = block @ weight
        return (g / counted.sum() if divide else g).reshape(hidden.shape)

    shifted = torch.full_like(labels, IGNORE)
    shifted[:, :-1] = labels[:, 1:]
    shifted = shifted.reshape(-1)
    right = grad(shifted)
    return [
        (right * int((shifted != IGNORE).sum()), "divide by n, as the loss does."),
        (-right, "the gradient of the loss is softmax - onehot, not onehot - softmax."),
        (grad(shifted, subtract=False), "subtract the target's one-hot: dL/dz = softmax - onehot."),
        (grad(shifted, zero_ignored=False), "positions that do not count have gradient 0."),
        (
            grad(labels.reshape(-1)),
            "shift as in exercise 2: position t's target is labels[:, t+1].",
        ),
    ]


def _close(got, expected) -> bool:
    """Equal up to float rounding, relative to the largest entry."""
    tolerance = 1e-4 * float(expected.abs().max()) + 1e-9
    return allclose(got.to(expected.dtype), expected, rtol=0.0, atol=tolerance)


def _check_grad(chunked_nll_backward, hidden, weight, labels, chunk_rows) -> tuple[float, int]:
    """Compare chunked_nll_backward with autograd; watch the blocks; explain a mismatch.

    Returns (the largest difference from autograd, the most rows of logits held at once).
    """
    with _LogitsWatch(weight) as watch, torch.no_grad(), _no_autograd():
        out = chunked_nll_backward(hidden, weight, labels, chunk_rows)
    expect(
        isinstance(out, tuple) and len(out) == 2,
        f"chunked_nll_backward returned {type(out).__name__}. Hint: return (loss, grad_hidden).",
    )
    loss, got = out
    expected_loss, expected = _autograd(hidden, weight, labels)
    expect(
        watch.rows <= chunk_rows,
        f"chunked_nll_backward computed a block of {watch.rows} rows of logits, with "
        f"chunk_rows={chunk_rows}. Hint: work on one chunk of at most chunk_rows rows at a time.",
    )
    expect(
        isinstance(loss, torch.Tensor) and loss.numel() == 1,
        "the loss must be a 0-dim tensor. Hint: return the loss of exercise 2 first.",
    )
    expect(
        allclose(loss.float().reshape(()), expected_loss, rtol=1e-5, atol=1e-6),
        f"the loss is {float(loss):.6f}, but the model's loss is {float(expected_loss):.6f}. "
        "Hint: compute it as in exercise 2: the summed losses of all chunks / n.",
    )
    expect(
        isinstance(got, torch.Tensor) and tuple(got.shape) == tuple(hidden.shape),
        f"grad_hidden must have hidden's shape {tuple(hidden.shape)}, got "
        f"{tuple(got.shape) if isinstance(got, torch.Tensor) else type(got).__name__}. "
        "Hint: give the rows of gradients back the shape of hidden.",
    )
    if _close(got, expected):
        return float((got - expected).abs().max()), watch.rows
    if not got.isfinite().all():
        hint = "the gradient has inf or NaN: use torch.softmax (a plain exp overflows)."
    else:
        hint = (
            "compare each counted row with the closed form above, and give the rows that do "
            "not count a zero gradient."
        )
        for wrong, text in _grad_mistakes(hidden, weight, labels):
            if _close(got, wrong):
                hint = text
                break
    expect(
        False,
        f"grad_hidden (chunk_rows={chunk_rows}) is off by up to "
        f"{float((got - expected).abs().max()):.3g} (autograd's largest entry is "
        f"{float(expected.abs().max()):.3g}). Hint: {hint}",
    )
    return 0.0, watch.rows  # not reached


class _ChunkedLoss(torch.autograd.Function):
    """A chunked_nll_backward as an autograd operation: the gradient is ready after the forward."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, chunk_rows, chunked_nll_backward):
        loss, grad_hidden = chunked_nll_backward(hidden, weight, labels, chunk_rows)
        ctx.save_for_backward(grad_hidden)
        return loss

    @staticmethod
    def backward(ctx, grad_output):
        (grad_hidden,) = ctx.saved_tensors
        return grad_output * grad_hidden, None, None, None, None


def _training_model(seed=0, **shape):
    """The notebook's training_model: the tiny model in training mode, its embedding frozen."""
    model = _tiny_model(seed, **shape).train()
    model.get_input_embeddings().weight.requires_grad_(False)
    return model


def _step_grads(model, batch, chunk_rows=None, chunked_nll_backward=None):
    """The gradients of one backward, through the model's own loss or through _ChunkedLoss."""
    model.zero_grad()
    if chunk_rows is None:
        model(**batch).loss.backward()
    else:
        hidden = model.model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
        ).last_hidden_state
        with _no_autograd():
            loss = _ChunkedLoss.apply(
                hidden, model.lm_head.weight, batch["labels"], chunk_rows, chunked_nll_backward
            )
        loss.backward()
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}


def _check_training(chunked_nll_backward, model, batch, chunk_rows) -> int:
    """Every gradient of a training step through _ChunkedLoss against the model's own loss."""
    expected = _step_grads(model, batch)
    got = _step_grads(model, batch, chunk_rows, chunked_nll_backward)
    for name, grad in expected.items():
        expect(
            _close(got[name], grad),
            f"through ChunkedLoss, the gradient of {name} is off by up to "
            f"{float((got[name] - grad).abs().max()):.3g}. Hint: grad_hidden must be d loss / d "
            "hidden for the loss you return; check it with the tests above.",
        )
    return len(expected)


def _visible_grad_cases():
    """The visible test: ((hidden, weight, labels, chunk_rows), ...) and the training step."""
    small, small_batch = small_model(seed=1), random_batch(0, [20, 13, 17])
    cases = [
        (*_lm_head_inputs(_tiny_model(), _lab_batch(2)), 64),
        (*_lm_head_inputs(small, small_batch), 7),
    ]
    training = [(_training_model(seed=1, vocab_size=1000, hidden_size=32), small_batch, 9)]
    return cases, training


@exercise(3, "chunked_nll_backward")
def chunked_nll_backward(chunked_nll_backward, cases=None, training=()) -> str | None:
    """Exercise 3: the loss and d loss / d hidden against autograd, and a training step.

    `cases` is a list of (hidden, weight, labels, chunk_rows), compared with autograd through
    transformers' ForCausalLMLoss (autograd refused inside the learner's function, the blocks of
    logits watched); `training` a list of (model in training mode, batch, chunk_rows): every
    gradient of a step through the function, as an autograd operation, must match the model's own
    loss's. Without `cases`, the visible test (the lab's batch, reported, a random batch and one
    training step).
    """
    visible = cases is None
    if visible:
        cases, training = _visible_grad_cases()
    results = [_check_grad(chunked_nll_backward, *case) for case in cases]
    grads = [_check_training(chunked_nll_backward, *case) for case in training]
    if not visible:
        return None
    (gap, held), (_, weight, labels, _) = results[0], cases[0]
    mb = weight.shape[0] * 4 / 2**20
    return (
        f"the lab's batch: grad_hidden = autograd's up to {gap:.1e}, from logits blocks of at "
        f"most {held} rows ({held * mb:.1f} MB), where autograd keeps all {labels.numel()} rows "
        f"of logits and then their gradient ({2 * labels.numel() * mb:.0f} MB)\n"
        f"a training step through ChunkedLoss: its {grads[0]} gradients match the model's own "
        "loss's"
    )
