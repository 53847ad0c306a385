"""Checks for the exercises of lesson 14 (Merge and deploy): bytes on disk, combined adapters, GGUF.

Exercise 1 saves adapters and merged models of tiny Llamas with PEFT and transformers and reads
their tensors back with safetensors; exercise 2 compares an update with what PEFT's
`add_weighted_adapter` builds, layer by layer; exercise 3 compares the rotary permutation of a
GGUF file with `course_utils.deploy` and transformers' GGUF loader, and llama.cpp's RoPE with
transformers' own, down to the attention scores of a tiny Llama.
"""

from __future__ import annotations

import math
import os
import tempfile
from pathlib import Path
from unittest import mock

import gguf
import numpy as np
import torch
from peft import LoraConfig, get_peft_model
from peft.tuners.lora import LoraLayer, LoraModel
from safetensors import safe_open
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaConfig, PreTrainedTokenizerFast
from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb
from transformers.utils import logging as transformers_logging

from course_utils import assets, deploy
from course_utils.exercise_checks.feedback import allclose, exercise, expect
from course_utils.memory import count_params, get_config, lora_trainable_params, weight_bytes

#: Bound at import, like feedback's comparisons: the references the checks compare with.
_array_equal = np.array_equal
_reference_permute = deploy.permute_for_gguf
_reference_unpermute = LlamaTensorProcessor._reverse_permute_weights
_export_gguf = deploy.export_gguf
_tiny_llama = assets.tiny_llama
TINY = dict(assets.TINY_LLAMA)
DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


# --------------------------------------------------------------------------------------------
# Exercise 1: an adapter and a merged model on disk
# --------------------------------------------------------------------------------------------


def _tensor_bytes(path) -> int:
    """The bytes of all tensors of a safetensors file, each read back with safetensors."""
    with safe_open(path, framework="pt") as file:
        return sum(file.get_tensor(key).nbytes for key in file.keys())


def _save(folder, shape, r, targets, dtype, seed=0) -> tuple[Path, Path]:
    """Save an adapter and the merged model of the tiny Llama (shape) in dtype; return both files."""
    model = _tiny_llama(seed=seed, **shape).eval().to(dtype)
    lora = LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets, task_type="CAUSAL_LM")
    peft_model = get_peft_model(model, lora)
    folder = Path(tempfile.mkdtemp(dir=folder))
    bars = transformers_logging.is_progress_bar_enabled()
    transformers_logging.disable_progress_bar()  # a check prints its verdict only
    try:
        peft_model.save_pretrained(folder / "adapter")
        peft_model.merge_and_unload().save_pretrained(folder / "merged")
    finally:
        if bars:
            transformers_logging.enable_progress_bar()
    return folder / "adapter" / "adapter_model.safetensors", folder / "merged" / "model.safetensors"


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _adapter_hint(got, lora, per, layers) -> str:
    """The mistake an adapter byte count looks like."""
    wrong = [
        (per != 4 and lora * per, "PEFT keeps A and B in fp32 on a bf16/fp16 base: 4 bytes each."),
        (lora, "that is the number of values; a byte count multiplies it by 4 (fp32)."),
        (
            lora // layers * 4,
            "every decoder layer has its own A and B: count all num_hidden_layers.",
        ),
    ]
    return next(
        (h for v, h in wrong if v == got),
        "the adapter holds A and B of every targeted projection in every decoder layer (the "
        "LoRA count of course_utils.memory for these targets), 4 bytes each (fp32).",
    )


def _merged_hint(got, n, lora, per, emb, tied) -> str:
    """The mistake a merged model byte count looks like."""
    wrong = [
        (tied and (n + emb) * per, "the LM head is tied to the embeddings here: saved once."),
        ((n + lora) * per, "merging adds s * B @ A into the weights: it saves no new tensor."),
        (per != 4 and n * 4, "the merged model keeps the base model's dtype, not fp32."),
        (n, "that is the number of values, not bytes: each takes the dtype's size in bytes."),
        (
            not tied and (n - emb) * per,
            "an untied LM head is a weight of its own: course_utils.memory counts it.",
        ),
    ]
    return next(
        (h for v, h in wrong if v == got),
        "the merged file holds every weight of the base model (as course_utils.memory counts "
        "them), each in the base model's dtype.",
    )


def _check_saved(saved_bytes, folder, config, r, targets, dtype):
    """Compare saved_bytes with real files (config: changes of TINY) or with course_utils.memory
    (config: a preset name); explain a mismatch. Return the two files, or None for a preset."""
    if isinstance(config, str):
        files = None
        adapter = lora_trainable_params(config, r, targets) * 4
        merged = weight_bytes(config, DTYPE_NAMES[dtype])
        answer_config = config
    else:
        files = _save(folder, config, r, targets, dtype)
        adapter, merged = (_tensor_bytes(file) for file in files)
        answer_config = {**TINY, **config}
    got = saved_bytes(answer_config, r, targets, dtype)
    expect(
        isinstance(got, tuple) and len(got) == 2 and all(_is_int(x) for x in got),
        f"saved_bytes returned {got!r}. Hint: return a tuple of two ints: the adapter's bytes, "
        "then the merged model's.",
    )
    cfg = get_config(answer_config)
    lora = lora_trainable_params(cfg, r, targets)
    n, per, tied = count_params(cfg), dtype.itemsize, cfg["tie_word_embeddings"]
    where = f"(r={r}, targets={targets!r}, {dtype}, tie_word_embeddings={tied})"
    expect(
        got[0] == adapter,
        f"the adapter's tensors take {adapter:,} bytes {where}, you said {got[0]:,}. "
        f"Hint: {_adapter_hint(got[0], lora, per, cfg['num_hidden_layers'])}",
    )
    emb = cfg["vocab_size"] * cfg["hidden_size"]
    expect(
        got[1] == merged,
        f"the merged model's tensors take {merged:,} bytes {where}, you said {got[1]:,}. "
        f"Hint: {_merged_hint(got[1], n, lora, per, emb, tied)}",
    )
    return files


def _check_payload(payload_bytes, path) -> int:
    """Compare payload_bytes with the tensors read back with safetensors; explain a mismatch."""
    path = Path(path)
    expected, size = _tensor_bytes(path), os.path.getsize(path)
    with open(path, "rb") as file:
        first = file.read(8)
    got = payload_bytes(path)
    expect(_is_int(got), f"payload_bytes returned {type(got).__name__}. Hint: return an int.")
    if got == expected:
        return got
    header = int.from_bytes(first, "little")
    wrong = [
        (size, "that is the whole file: leave out the 8 bytes of N and the N bytes of JSON."),
        (size - 8, "leave out the JSON header too: N, its length, is in the first 8 bytes."),
        (size - header, "leave out the 8 bytes that hold N as well."),
        (
            size - 8 - int.from_bytes(first, "big"),
            "you read N as big-endian; safetensors stores it little-endian (lowest byte first).",
        ),
    ]
    hint = next(
        (h for v, h in wrong if v == got),
        "the tensor data is what follows the 8 bytes of N and the N bytes of JSON.",
    )
    expect(
        False,
        f"{path.name} ({size:,} bytes) holds {expected:,} bytes of tensors, you said {got:,}. "
        f"Hint: {hint}",
    )
    return got


def _bytes_report(saved_bytes, payload_bytes, files) -> str:
    """The files' sizes, and an adapter against a merged model of real sizes."""
    lines = []
    for file in files:
        size, payload = os.path.getsize(file), payload_bytes(file)
        lines.append(
            f"{file.name:26s} {size:8,} bytes on disk, {payload:8,} of them tensors "
            f"(header {size - payload:,})"
        )
    for model in ("SmolLM2-135M", "Llama-2-7B"):
        adapter, merged = saved_bytes(model, 16, "all-linear", torch.bfloat16)
        fp32 = saved_bytes(model, 16, "all-linear", torch.float32)[1]
        lines.append(
            f"{model}, LoRA r=16 on all linear layers: adapter {adapter / 2**20:,.1f} MB; merged "
            f"{merged / 2**20:,.0f} MB in bf16 ({adapter / merged:.1%}), "
            f"{fp32 / 2**20:,.0f} MB in fp32"
        )
    return "\n".join(lines)


#: (changes of the tiny Llama's config, or a preset name; r; targets; dtype; also check
#: payload_bytes on the two files) of the visible tests.
SAVED_CASES = [
    ({}, 4, ["q_proj", "v_proj"], torch.float32, False),
    ({}, 8, "all-linear", torch.bfloat16, True),
]


@exercise(1, "saved_bytes", "payload_bytes")
def saved_bytes(saved_bytes, payload_bytes, cases=SAVED_CASES, files=()) -> str:
    """Exercise 1: bytes of an adapter and of a merged model, and of a safetensors file's tensors.

    `files` are more safetensors files to check payload_bytes on.
    """
    with tempfile.TemporaryDirectory(prefix="deploy-checks-") as folder:
        shown = []
        for config, r, targets, dtype, payload in cases:
            saved = _check_saved(saved_bytes, folder, config, r, targets, dtype)
            if payload and saved:
                for file in saved:
                    _check_payload(payload_bytes, file)
                shown = saved
        for file in files:
            _check_payload(payload_bytes, file)
        return _bytes_report(saved_bytes, payload_bytes, shown)


# --------------------------------------------------------------------------------------------
# Exercise 2: what a combined adapter adds
# --------------------------------------------------------------------------------------------


def _with_adapters(configs, seed=0, **shape):
    """The tiny Llama with an adapter per {name: LoraConfig}, A and B random (the notebook's)."""
    peft_model = None
    for name, config in configs.items():
        if peft_model is None:
            model = _tiny_llama(seed=seed, **shape).eval()
            peft_model = get_peft_model(model, config, adapter_name=name)
        else:
            peft_model.add_adapter(name, config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=g) * 0.1)
    return peft_model


def _lora(r, alpha, targets) -> LoraConfig:
    return LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, task_type="CAUSAL_LM")


def _visible_models():
    """The notebook's `pair` and the visible tests' model with two adapters of the same rank."""
    pair = _with_adapters(
        {"rentals": _lora(4, 8, ["q_proj", "v_proj"]), "docs": _lora(8, 8, ["q_proj", "k_proj"])}
    )
    targets = ["q_proj", "v_proj", "down_proj"]
    same = _with_adapters({"rentals": _lora(4, 8, targets), "docs": _lora(4, 16, targets)}, seed=1)
    return pair, same


def _refuse(*args, **kwargs):
    raise AssertionError(
        "combined_delta called add_weighted_adapter. Hint: build the update from the layer's "
        "lora_A, lora_B and scaling."
    )


def _truncate(delta, rank):
    """The best rank-`rank` approximation of delta (its truncated SVD)."""
    U, S, Vh = torch.linalg.svd(delta, full_matrices=False)
    return U[:, :rank] @ torch.diag(S[:rank]) @ Vh[:rank]


def _mistakes(layer, adapters, weights, combination_type, svd_rank):
    """(update, hint) of typical mistakes, computed from the layer's own tensors."""
    present = [(a, w) for a, w in zip(adapters, weights) if a in layer.lora_A]
    A = {a: layer.lora_A[a].weight for a, _ in present}
    B = {a: layer.lora_B[a].weight for a, _ in present}
    s = layer.scaling

    def summed(factor):
        return sum(factor(a, w) * B[a] @ A[a] for a, w in present)

    def sides(on_B, on_A):
        return sum(on_B(a, w) * B[a] for a, w in present) @ sum(
            on_A(a, w) * A[a] for a, w in present
        )

    def root(a, w):
        return math.sqrt(abs(w * s[a]))

    def signed_root(a, w):
        return math.copysign(root(a, w), w * s[a])

    exact = summed(lambda a, w: w * s[a])
    rank = svd_rank or max(layer.r[a] for a, _ in present)
    same_rank = len({layer.r[a] for a, _ in present}) == 1
    found = []
    if combination_type == "linear" and same_rank:
        found += [
            (
                exact,
                "'linear' does not add the updates: it adds the A's and the B's, so B @ A has "
                "cross terms B_i @ A_j.",
            ),
            (sides(lambda a, w: w * s[a], lambda a, w: w * s[a]), "each side gets sqrt(|w * s|)."),
            (
                sides(lambda a, w: w, lambda a, w: w),
                "each side gets sqrt(|w * s|), scaling included.",
            ),
            (sides(lambda a, w: 1.0, lambda a, w: w * s[a]), "each side gets sqrt(|w * s|)."),
            (sides(signed_root, signed_root), "the sign of w * s goes on A only."),
            (sides(root, root), "a negative w * s subtracts: its sign goes on the A side."),
        ]
    if combination_type == "svd":
        found.append((exact, f"truncate the sum: keep its {rank} largest singular values."))
        for other in range(1, sum(layer.r[a] for a, _ in present) + 1):
            if other != rank:
                found.append(
                    (
                        _truncate(exact, other),
                        f"keep {rank} singular values here, not {other}: svd_rank, or the "
                        "largest r of the adapters when it is None.",
                    )
                )
    if combination_type == "cat" and same_rank:
        found.append(
            (sides(signed_root, signed_root), "'cat' is the exact weighted sum of the updates.")
        )
    for factor, hint in (
        (lambda a, w: w, "scale each update by its adapter's scaling s (the layer's, per name)."),
        (lambda a, w: s[a], "multiply each adapter's update by its weight w."),
        (lambda a, w: (w * s[a]) ** 2, "w * s multiplies one side (A), not both."),
    ):
        wrong = summed(factor)
        found.append((_truncate(wrong, rank) if combination_type == "svd" else wrong, hint))
    return found


def _close(a, b) -> bool:
    return allclose(a, b, rtol=1e-4, atol=1e-6)


def _call_combined(combined_delta, layer, layer_name, adapters, weights, kind, svd_rank):
    """The learner's update of one layer, add_weighted_adapter out of reach."""
    with mock.patch.object(LoraModel, "add_weighted_adapter", _refuse):
        try:
            return combined_delta(layer, list(adapters), list(weights), kind, svd_rank)
        except KeyError as error:
            expect(
                False,
                f"combined_delta raised KeyError({error}) in {layer_name}, which not every "
                "adapter targets. Hint: an adapter that does not target a layer adds nothing "
                "there; its name is missing from the layer's lora_A.",
            )


def _check_layer(combined_delta, layer, short, adapters, weights, kind, svd_rank, expected):
    """Compare the learner's update of one layer with PEFT's."""
    got = _call_combined(combined_delta, layer, short, adapters, weights, kind, svd_rank)
    expect(
        isinstance(got, torch.Tensor) and got.shape == expected.shape,
        f"combined_delta returned {type(got).__name__} {tuple(getattr(got, 'shape', ()))} for "
        f"{short}, expected a tensor of shape {tuple(expected.shape)}. "
        "Hint: return the d_out x d_in update itself.",
    )
    gap = float((got - expected).abs().max())
    if not _close(got, expected):
        hint = next(
            (h for v, h in _mistakes(layer, adapters, weights, kind, svd_rank) if _close(got, v)),
            "follow the recipe of the text for this combination_type.",
        )
        expect(
            False,
            f"{kind!r} with weights {weights}: your update of {short} differs from PEFT's by up "
            f"to {gap:.3g}. Hint: {hint}",
        )
    return gap


def _check_combination(combined_delta, model, adapters, weights, kind, svd_rank=None) -> float:
    """Combine with PEFT; compare combined_delta with its update in every layer it adapts."""
    name = f"combined_{len(model.peft_config)}"
    model.add_weighted_adapter(adapters, weights, name, combination_type=kind, svd_rank=svd_rank)
    worst = 0.0
    try:
        for layer_name, layer in model.named_modules():
            if not isinstance(layer, LoraLayer) or name not in layer.lora_A:
                continue
            short = layer_name.removeprefix("base_model.model.model.")
            with torch.no_grad():
                expected = layer.get_delta_weight(name)
                gap = _check_layer(
                    combined_delta, layer, short, adapters, weights, kind, svd_rank, expected
                )
            worst = max(worst, gap)
    finally:
        model.delete_adapter(name)
    return worst


def _check_rejects(combined_delta, model, adapters, weights, kind) -> None:
    """combined_delta must reject a combination type it does not know with a ValueError."""
    layer = next(m for m in model.modules() if isinstance(m, LoraLayer))
    with torch.no_grad(), mock.patch.object(LoraModel, "add_weighted_adapter", _refuse):
        try:
            got = combined_delta(layer, list(adapters), list(weights), kind)
        except ValueError:
            return
    expect(
        False,
        f"combined_delta(..., {kind!r}) returned {type(got).__name__} instead of raising "
        "ValueError. Hint: a combination_type other than the three of the text is an error.",
    )


def _ranks_report(combined_delta, model) -> str:
    """Rank and error of the three types against the exact sum, on the first layer's q_proj."""
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    lines = []
    with torch.no_grad():
        wanted = combined_delta(layer, ["rentals", "docs"], [1.0, 1.0], "cat")
        for kind in ("cat", "svd", "linear"):
            delta = combined_delta(layer, ["rentals", "docs"], [1.0, 1.0], kind)
            lines.append(
                f"{kind:6s} rank {int(torch.linalg.matrix_rank(delta)):2d}, relative error "
                f"against w1 dW1 + w2 dW2: {float((delta - wanted).norm() / wanted.norm()):.2e}"
            )
    return "\n".join(lines)


@exercise(2, "combined_delta")
def combined_delta(combined_delta, cases=None, rejects=()) -> str | None:
    """Exercise 2: combined_delta against PEFT's add_weighted_adapter, in every adapted layer.

    `cases` is a list of (PEFT model with adapters, adapter names, weights, combination_type,
    svd_rank); without it, the visible tests. `rejects` are combination types for which
    combined_delta must reject with a ValueError (on the first case's model).
    """
    same = None
    if cases is None:
        pair, same = _visible_models()
        cases = [
            (pair, ["rentals", "docs"], [1.0, 1.0], "cat", None),
            (pair, ["rentals", "docs"], [1.0, 0.5], "svd", None),
            (same, ["rentals", "docs"], [1.0, 1.0], "linear", None),
        ]
    for model, adapters, weights, kind, svd_rank in cases:
        _check_combination(combined_delta, model, adapters, weights, kind, svd_rank)
    for kind in rejects:
        model, adapters, weights = cases[0][:3]
        _check_rejects(combined_delta, model, adapters, weights, kind)
    return None if same is None else _ranks_report(combined_delta, same)


# --------------------------------------------------------------------------------------------
# Exercise 3: the rotary permutation of a GGUF file
# --------------------------------------------------------------------------------------------


def _refuse_deploy(*args, **kwargs):
    raise AssertionError(
        "your function called the course's or transformers' permutation. Hint: reorder the rows "
        "yourself: split them per head, reorder each head's rows, join them again."
    )


def _call(function, *args):
    """Call one of the learner's functions with the course's and transformers' permutations
    out of reach."""
    with (
        mock.patch.object(deploy, "permute_for_gguf", _refuse_deploy),
        mock.patch.object(LlamaTensorProcessor, "_reverse_permute_weights", _refuse_deploy),
    ):
        return function(*args)


def _unpermute(weight, n_head):
    """transformers' GGUF loader's reordering (llama.cpp's rows back to Hugging Face's)."""
    return _reference_unpermute(LlamaTensorProcessor(), weight, n_head, n_head)


def _reorder(function, weight, n_head):
    """Call permute_for_gguf or unpermute_from_gguf; turn a crash into a hint."""
    try:
        return _call(function, weight, n_head)
    except NotImplementedError:  # not answered yet (a RuntimeError too)
        raise
    except (ValueError, IndexError, TypeError, RuntimeError) as error:
        expect(
            False,
            f"{function.__name__}(weight of shape {weight.shape}, n_head={n_head}) raised "
            f"{type(error).__name__}: {error}. Hint: weight is any (n_head * d, ...) array, a "
            "1-D bias too: keep its trailing dimensions as they are when you split the rows "
            "into heads.",
        )


def _order(got, weight):
    """The rows of weight that got holds, in order (None if got is no reordering of them)."""
    index = {row.tobytes(): i for i, row in enumerate(weight.reshape(len(weight), -1))}
    rows = [index.get(row.tobytes()) for row in np.asarray(got).reshape(len(weight), -1)]
    return None if None in rows else rows


def _check_rows(name, got, expected, weight, n_head, mistakes) -> None:
    """Compare a reordering with the expected one; say which mistake it looks like."""
    expect(
        isinstance(got, np.ndarray),
        f"{name} returned {type(got).__name__}. Hint: return a NumPy array.",
    )
    expect(
        got.shape == weight.shape and got.dtype == weight.dtype,
        f"{name} returned shape {got.shape}, {got.dtype}; expected {weight.shape}, "
        f"{weight.dtype}. Hint: the result keeps the shape and the dtype of weight.",
    )
    if _array_equal(got, expected):
        return
    hint = next((h for v, h in mistakes if v is not None and _array_equal(got, v)), None)
    d = len(weight) // n_head
    order, wanted = _order(got, weight), _order(expected, weight)
    if hint is None:
        hint = "in each head of d rows, GGUF row 2i is Hugging Face row i, row 2i+1 is row i + d/2."
    shown = f"rows {order[:d]}" if order else "values that are not just its rows reordered"
    expect(
        False,
        f"{name}(weight of shape {weight.shape}, n_head={n_head}): the first head (d = {d}) "
        f"holds {shown}, expected rows {wanted[:d]}. Hint: {hint}",
    )


def _weight(shape, dtype=np.float32):
    rng = np.random.default_rng(sum(shape))
    return rng.standard_normal(shape).astype(dtype)


def _check_permute(permute_for_gguf, shape, n_head, dtype=np.float32) -> None:
    """Compare permute_for_gguf with deploy.permute_for_gguf."""
    weight = _weight(shape, dtype)
    original = weight.copy()
    got = _reorder(permute_for_gguf, weight, n_head)
    expect(
        _array_equal(weight, original),
        "permute_for_gguf changed its input. Hint: build and return a new array.",
    )
    mistakes = [
        (weight, "the rows are in their old order."),
        (
            _unpermute(weight, n_head),
            "that is the inverse (GGUF to Hugging Face): row 2i of the result is row i.",
        ),
        (
            _reference_permute(weight, 1) if n_head > 1 else None,
            "reorder inside each head: split the rows into n_head heads of d rows first.",
        ),
    ]
    if weight.ndim == 2 and weight.shape[1] % (2 * n_head) == 0:
        mistakes.append(
            (
                _reference_permute(weight.T, n_head).T,
                "reorder the rows (outputs), not the columns.",
            )
        )
    expected = _reference_permute(weight, n_head)
    _check_rows("permute_for_gguf", got, expected, weight, n_head, mistakes)


def _check_unpermute(unpermute_from_gguf, shape, n_head, dtype=np.float32) -> None:
    """Compare unpermute_from_gguf with transformers' GGUF loader, and with undoing deploy's."""
    stored = _reference_permute(_weight(shape, dtype), n_head)
    original = stored.copy()
    got = _reorder(unpermute_from_gguf, stored, n_head)
    expect(
        _array_equal(stored, original),
        "unpermute_from_gguf changed its input. Hint: build and return a new array.",
    )
    mistakes = [
        (stored, "the rows are in their old order."),
        (
            _reference_permute(stored, n_head),
            "that reorders the rows once more the same way: undo it, row i of the result is "
            "row 2i of the GGUF tensor and row i + d/2 is row 2i + 1.",
        ),
        (
            _unpermute(stored, 1) if n_head > 1 else None,
            "reorder inside each head: split the rows into n_head heads of d rows first.",
        ),
    ]
    _check_rows("unpermute_from_gguf", got, _unpermute(stored, n_head), stored, n_head, mistakes)


def _hf_rope(x, positions, theta, sign=1.0, exponent=2):
    """transformers' RoPE of x (Hugging Face layout); sign and exponent give typical mistakes."""
    d = x.shape[-1]
    rope = {"rope_type": "default", "rope_theta": theta}
    config = LlamaConfig(hidden_size=d, num_attention_heads=1, head_dim=d, rope_parameters=rope)
    cos, sin = LlamaRotaryEmbedding(config)(x, positions[None])
    if exponent != 2:  # a mistake: pair i turning at theta ** (-i / d)
        angles = positions.float()[:, None] * theta ** (-torch.arange(d // 2).float() / d)
        angles = torch.cat((angles, angles), dim=-1)[None]
        cos, sin = angles.cos(), angles.sin()
    return apply_rotary_pos_emb(x, x, cos[0], sign * sin[0], unsqueeze_dim=0)[0].reshape(x.shape)


def _rope_close(a, b) -> bool:
    return allclose(a, b, rtol=1e-4, atol=1e-5)


def _rope_mistakes(x, positions, theta, to_gguf):
    """(rotated x, hint) of typical mistakes."""
    steps = torch.arange(len(positions))
    return [
        (
            _hf_rope(x[..., to_gguf], positions, theta),
            "llama.cpp rotates neighbours (2i, 2i + 1), not i and i + d/2 (rotate_half).",
        ),
        (_hf_rope(x, positions, theta, sign=-1.0)[..., to_gguf], "rotate by +phi, not -phi."),
        (
            _hf_rope(x, positions, theta, exponent=1)[..., to_gguf],
            "the exponent of theta for pair i has 2i in it, not i.",
        ),
        (
            _hf_rope(x, steps, theta)[..., to_gguf],
            "rotate by the positions given, not 0, 1, 2, ...",
        ),
        (_hf_rope(x, positions, 10000.0)[..., to_gguf], f"use the theta given ({theta:g})."),
        (x[..., to_gguf], "x came back unrotated."),
        (
            _hf_rope(x, positions, theta),
            "keep each rotated pair next to each other, x'[2i] then x'[2i+1], not all the "
            "first coordinates followed by all the second ones.",
        ),
    ]


def _check_rope(rope_interleaved, shape, positions, theta) -> None:
    """Compare rope_interleaved on GGUF-ordered vectors with transformers' RoPE on the originals."""
    d = shape[-1]
    positions = torch.as_tensor(positions)
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(d + len(positions)))
    to_gguf = _reference_permute(np.arange(d), 1)  # a head's coordinates in GGUF order
    expected = _hf_rope(x, positions, theta)[..., to_gguf]
    got = _call(rope_interleaved, x[..., to_gguf].clone(), positions.clone(), theta)
    expect(
        isinstance(got, torch.Tensor) and got.shape == x.shape,
        f"rope_interleaved returned {type(got).__name__} {tuple(getattr(got, 'shape', ()))}, "
        f"expected a tensor of shape {tuple(x.shape)}. Hint: rotate x, keep its shape.",
    )
    if _rope_close(got, expected):
        return
    hint = next(
        (h for v, h in _rope_mistakes(x, positions, theta, to_gguf) if _rope_close(got, v)),
        "compare each pair (2i, 2i + 1) with the formula of the text: the angle, which "
        "coordinate gets cos and which sin, and the signs.",
    )
    expect(
        False,
        f"rope_interleaved (x of shape {tuple(x.shape)}, theta {theta:g}) is off by up to "
        f"{float((got - expected).abs().max()):.3g}. Hint: {hint}",
    )


def _scores(permute_for_gguf, rope_interleaved, model, x, layout):
    """Attention scores q . k / sqrt(d) of layer 0 in a layout: "transformers", "gguf" or
    "unpermuted" (llama.cpp's RoPE on rows left in Hugging Face's order)."""
    config, attention = model.config, model.model.layers[0].self_attn
    heads, kv_heads, d = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    theta, positions = config.rope_parameters["rope_theta"], torch.arange(x.shape[0])
    Wq, Wk = attention.q_proj.weight.detach(), attention.k_proj.weight.detach()
    if layout == "gguf":
        Wq = torch.from_numpy(_call(permute_for_gguf, Wq.numpy(), heads))
        Wk = torch.from_numpy(_call(permute_for_gguf, Wk.numpy(), kv_heads))
    q = (x @ Wq.T).reshape(len(x), heads, d).transpose(0, 1)
    k = (x @ Wk.T).reshape(len(x), kv_heads, d).transpose(0, 1)
    if layout == "transformers":
        q, k = (_hf_rope(t, positions, theta) for t in (q, k))
    else:
        q, k = (_call(rope_interleaved, t, positions, theta) for t in (q, k))
    k = k.repeat_interleave(heads // kv_heads, dim=0)  # grouped-query attention: shared keys
    return q @ k.transpose(1, 2) / math.sqrt(d)


def _check_scores(permute_for_gguf, rope_interleaved, model, seq_len=6):
    """llama.cpp's scores (the learner's permutation and RoPE) must be transformers' scores."""
    x = torch.randn(seq_len, model.config.hidden_size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = _scores(permute_for_gguf, rope_interleaved, model, x, "transformers")
        got = _scores(permute_for_gguf, rope_interleaved, model, x, "gguf")
    gap = float((got - expected).abs().max())
    expect(
        gap < 1e-4,
        f"the attention scores of the GGUF layout differ from transformers' by {gap:.3g}. Hint: "
        "q_proj is permuted with num_attention_heads heads, k_proj with num_key_value_heads, "
        "and rope_interleaved must rotate x of shape (heads, seq_len, d).",
    )
    return gap, float(expected.abs().max())


def _byte_tokenizer():
    """A byte-level BPE tokenizer of 257 tokens: GGUFReader reads the course's 49,152 slowly."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tokenizer = Tokenizer(models.BPE({c: i for i, c in enumerate(alphabet)}, []))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|im_end|>")


def _check_gguf_file(permute_for_gguf, unpermute_from_gguf, seed, shape) -> None:
    """The q_proj and k_proj tensors of a GGUF file written by deploy.export_gguf."""
    tokenizer = _byte_tokenizer()
    model = _tiny_llama(seed=seed, **{**shape, "vocab_size": len(tokenizer)}).eval()
    heads = {"q": model.config.num_attention_heads, "k": model.config.num_key_value_heads}
    with tempfile.TemporaryDirectory(prefix="deploy-checks-") as folder:
        path = _export_gguf(model, tokenizer, Path(folder) / "tiny.gguf", dtype="f32")
        stored = {t.name: np.array(t.data) for t in gguf.GGUFReader(path).tensors}
    for i, block in enumerate(model.model.layers):
        for kind, proj in (("q", block.self_attn.q_proj), ("k", block.self_attn.k_proj)):
            hf_weight, name = proj.weight.detach().numpy(), f"blk.{i}.attn_{kind}.weight"
            expect(
                _array_equal(_call(permute_for_gguf, hf_weight, heads[kind]), stored[name]),
                f"{name} in the GGUF file is not your permutation of the weight. "
                f"Hint: permute with n_head = {heads[kind]}.",
            )
            expect(
                _array_equal(_call(unpermute_from_gguf, stored[name], heads[kind]), hf_weight),
                f"unpermute_from_gguf does not bring {name} of the GGUF file back to the "
                f"Hugging Face weight. Hint: undo permute_for_gguf with n_head = {heads[kind]}.",
            )


def _scores_report(permute_for_gguf, rope_interleaved) -> str:
    """The visible model's scores both ways, and without the permutation."""
    model = _tiny_llama(seed=0).eval()
    gap, size = _check_scores(permute_for_gguf, rope_interleaved, model)
    x = torch.randn(6, model.config.hidden_size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        wrong = _scores(permute_for_gguf, rope_interleaved, model, x, "unpermuted") - _scores(
            permute_for_gguf, rope_interleaved, model, x, "transformers"
        )
    return (
        f"attention scores (up to {size:.2f}), llama.cpp's way vs transformers': differ by "
        f"{gap:.1e}\nthe same without the permutation of q_proj and k_proj: by "
        f"{float(wrong.abs().max()):.2f}"
    )


#: The visible tests: ("permute" or "unpermute", shape, n_head, NumPy dtype),
#: ("rope", shape of x, positions, theta), ("scores", seed, changes of the tiny Llama, seq_len);
#: the hidden ones add ("gguf", seed, changes of the tiny Llama): a file of deploy.export_gguf.
ROTARY_CASES = [
    ("permute", (24, 5), 3, np.float32),
    ("permute", (32, 64), 2, np.float32),
    ("unpermute", (24, 5), 3, np.float32),
    ("unpermute", (64, 16), 4, np.float32),
    ("rope", (4, 5, 16), range(5), 10000.0),
    ("scores", 0, {}, 6),
]


@exercise(3, "permute_for_gguf", "unpermute_from_gguf", "rope_interleaved")
def permute_for_gguf(
    permute_for_gguf, unpermute_from_gguf, rope_interleaved, cases=ROTARY_CASES
) -> str:
    """Exercise 3: the GGUF row order and back, llama.cpp's RoPE, and the scores both ways."""
    for kind, *case in cases:
        if kind == "permute":
            _check_permute(permute_for_gguf, *case)
        elif kind == "unpermute":
            _check_unpermute(unpermute_from_gguf, *case)
        elif kind == "rope":
            _check_rope(rope_interleaved, *case)
        elif kind == "scores":
            seed, shape, seq_len = case
            model = _tiny_llama(seed=seed, **shape).eval()
            _check_scores(permute_for_gguf, rope_interleaved, model, seq_len)
        elif kind == "gguf":
            _check_gguf_file(permute_for_gguf, unpermute_from_gguf, *case)
        else:
            raise ValueError(f"unknown case {kind!r}")
    return _scores_report(permute_for_gguf, rope_interleaved)
