"""Deploying a fine-tuned model: serve it, time it, and export it to a GGUF file.

Lesson 14.

Lab 14 reads this module:

- `generate` answers one prompt greedily and says how many tokens it wrote and how fast: the
  smallest possible "server" a learner can call;
- `tokens_per_second` times generation at a fixed length, so two models can be compared fairly
  (a PEFT model with an unmerged adapter against the merged one, say);
- `export_gguf` writes a merged Llama model and its tokenizer to one GGUF file with the ``gguf``
  package, the way llama.cpp's ``convert_hf_to_gguf.py`` does (same keys, same tensor names, the
  same rotary permutation of q_proj and k_proj); `load_gguf` reads it back with transformers;
- `gguf_metadata` lists a GGUF file's keys and tensor types (to compare with another file).
"""

from __future__ import annotations

import json
import os
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from . import env
from .assets import align_special_tokens
from .checks import positive_int
from .generation import Message, as_messages

__all__ = [
    "GGUF_DTYPES",
    "Generation",
    "export_gguf",
    "generate",
    "gguf_metadata",
    "load_gguf",
    "permute_for_gguf",
    "tokens_per_second",
]

#: The tensor types `export_gguf` writes (2-D weights; norms always stay f32, as in llama.cpp).
GGUF_DTYPES = ("f32", "f16")
#: The model types `export_gguf` knows how to write.
SUPPORTED_ARCHITECTURES = ("llama",)


def _check_model(model) -> None:
    """Raise unless `model` is a transformers model (not a PEFT wrapper)."""
    if not isinstance(model, torch.nn.Module) or not hasattr(model, "generate"):
        raise TypeError(
            f"model must be a transformers causal LM (got {type(model).__name__}); "
            "load one with assets.load_model()."
        )


# ---------------------------------------------------------------------------------------------
# 1. Serving: one prompt in, text and speed out.
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Generation:
    """One answer and what it cost."""

    text: str
    new_tokens: int
    seconds: float

    @property
    def tokens_per_second(self) -> float:
        """Generated tokens per second of wall time."""
        return self.new_tokens / self.seconds if self.seconds > 0 else 0.0


@torch.no_grad()
def generate(
    model,
    tokenizer,
    prompt: str | Sequence[Message],
    *,
    max_new_tokens: int = 64,
    system: str | None = None,
    min_new_tokens: int | None = None,
) -> Generation:
    """Answer one prompt greedily; return the text, the tokens generated and the seconds taken."""
    _check_model(model)
    max_new_tokens = positive_int(max_new_tokens, "max_new_tokens", "max_new_tokens=64")
    if min_new_tokens is not None:
        positive_int(min_new_tokens, "min_new_tokens", "min_new_tokens=32")
        if min_new_tokens > max_new_tokens:
            raise ValueError(
                f"min_new_tokens ({min_new_tokens}) must not exceed max_new_tokens "
                f"({max_new_tokens}); raise max_new_tokens or lower min_new_tokens."
            )
    text = tokenizer.apply_chat_template(
        as_messages(prompt, system), tokenize=False, add_generation_prompt=True
    )
    device = next(model.parameters()).device
    batch = tokenizer(text, return_tensors="pt", add_special_tokens=False).to(device)
    pad_id = (
        tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    )
    was_training = model.training
    model.eval()
    try:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        started = time.perf_counter()
        output = model.generate(
            **batch,
            max_new_tokens=max_new_tokens,
            min_new_tokens=min_new_tokens,
            do_sample=False,
            pad_token_id=pad_id,
        )
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - started
    finally:
        model.train(was_training)
    new = output[0, batch["input_ids"].shape[1] :]
    return Generation(
        text=tokenizer.decode(new, skip_special_tokens=True).strip(),
        new_tokens=int(new.numel()),
        seconds=seconds,
    )


def tokens_per_second(
    model, tokenizer, prompt: str | Sequence[Message], *, new_tokens: int = 32, repeats: int = 3
) -> float:
    """Return the median tokens/s of `repeats` greedy generations of exactly `new_tokens` tokens."""
    new_tokens = positive_int(new_tokens, "new_tokens", "new_tokens=32")
    repeats = positive_int(repeats, "repeats", "repeats=3")
    generate(model, tokenizer, prompt, max_new_tokens=2)  # warm-up: first-call overheads
    speeds = [
        generate(
            model, tokenizer, prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens
        ).tokens_per_second
        for _ in range(repeats)
    ]
    return statistics.median(speeds)


# ---------------------------------------------------------------------------------------------
# 2. GGUF export: the keys, the tokenizer, the tensors.
# ---------------------------------------------------------------------------------------------


def permute_for_gguf(weight: np.ndarray, n_head: int) -> np.ndarray:
    """Reorder q_proj/k_proj rows from Hugging Face's rotary layout to llama.cpp's (per head)."""
    if weight.ndim < 1 or n_head <= 0 or weight.shape[0] % (2 * n_head):
        raise ValueError(
            f"cannot split {weight.shape[0]} rows into {n_head} heads of two rotary halves; "
            "pass the weight of q_proj (n_head = attention heads) or k_proj (n_head = kv heads)."
        )
    return (
        weight.reshape(n_head, 2, weight.shape[0] // n_head // 2, *weight.shape[1:])
        .swapaxes(1, 2)
        .reshape(weight.shape)
    )


def _check_export(model, tokenizer, path, dtype: str) -> Path:
    """Validate export_gguf's arguments and return the target path."""
    try:
        from peft import PeftModel
    except ImportError:  # pragma: no cover - peft is part of the course
        PeftModel = ()  # noqa: N806
    if isinstance(model, PeftModel):
        raise ValueError(
            "This model still carries adapters; call model.merge_and_unload() and export the result."
        )
    _check_model(model)
    model_type = getattr(model.config, "model_type", None)
    if model_type not in SUPPORTED_ARCHITECTURES:
        raise ValueError(
            f"export_gguf writes {', '.join(SUPPORTED_ARCHITECTURES)} models only (got "
            f"{model_type!r}); use llama.cpp's convert_hf_to_gguf.py for other architectures."
        )
    if dtype not in GGUF_DTYPES:
        raise ValueError(
            f"dtype must be one of {GGUF_DTYPES} (got {dtype!r}); 'f16' halves the file."
        )
    biased = [k for k in ("attention_bias", "mlp_bias") if getattr(model.config, k, False)]
    if biased:
        raise ValueError(
            f"export_gguf writes Llamas without biases (this config sets {', '.join(biased)}); "
            "use llama.cpp's convert_hf_to_gguf.py, which also permutes the q/k biases."
        )
    if not getattr(tokenizer, "is_fast", False) or tokenizer.backend_tokenizer is None:
        raise TypeError(
            "tokenizer must be a fast (tokenizers) tokenizer; use assets.load_tokenizer()."
        )
    if json.loads(tokenizer.backend_tokenizer.to_str())["model"]["type"] != "BPE":
        raise ValueError("export_gguf writes byte-level BPE tokenizers (GPT-2 style) only.")
    if not isinstance(path, str | os.PathLike) or Path(path).suffix != ".gguf":
        raise ValueError(f"path must be a file name ending in .gguf (got {path!r}).")
    path = Path(path)
    if path.exists():
        raise FileExistsError(f"{path} exists already; delete it or choose another file name.")
    return path


def _write_config(writer, config, name: str, dtype: str) -> None:
    """Write the general.* and llama.* keys transformers and llama.cpp read."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    writer.add_type("model")
    writer.add_name(name)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    rope = getattr(config, "rope_parameters", None) or {}
    writer.add_rope_freq_base(float(rope.get("rope_theta", getattr(config, "rope_theta", 1e4))))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    file_type = gguf.LlamaFileType.ALL_F32 if dtype == "f32" else gguf.LlamaFileType.MOSTLY_F16
    writer.add_file_type(int(file_type))
    writer.add_vocab_size(config.vocab_size)
    writer.add_rope_dimension_count(head_dim)


def _write_tokenizer(writer, tokenizer, pre_tokenizer: str) -> None:
    """Write the byte-level BPE tokenizer: tokens, types, merges, special ids, chat template."""
    vocab = tokenizer.get_vocab()
    tokens = [token for token, _ in sorted(vocab.items(), key=lambda item: item[1])]
    if [vocab[t] for t in tokens] != list(range(len(tokens))):
        raise ValueError("the tokenizer's ids have gaps; export_gguf needs ids 0..n-1.")
    added = {i: t for i, t in tokenizer.added_tokens_decoder.items()}
    types = [
        gguf.TokenType.NORMAL
        if i not in added
        else (gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED)
        for i in range(len(tokens))
    ]
    merges = json.loads(tokenizer.backend_tokenizer.to_str())["model"]["merges"]
    merges = [m if isinstance(m, str) else " ".join(m) for m in merges]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre_tokenizer)
    writer.add_token_list(tokens)
    writer.add_token_types([int(t) for t in types])
    writer.add_token_merges(merges)
    for token, add in (
        (tokenizer.bos_token_id, writer.add_bos_token_id),
        (tokenizer.eos_token_id, writer.add_eos_token_id),
        (tokenizer.unk_token_id, writer.add_unk_token_id),
        (tokenizer.pad_token_id, writer.add_pad_token_id),
    ):
        if token is not None:
            add(int(token))
    writer.add_add_bos_token(False)
    writer.add_add_space_prefix(False)
    if tokenizer.chat_template:
        writer.add_chat_template(tokenizer.chat_template)


def _gguf_tensors(model, dtype: str):
    """Yield (gguf name, numpy array) for every weight, q/k permuted, 2-D weights in `dtype`."""
    config = model.config
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    for hf_name, tensor in model.state_dict().items():
        if hf_name == "lm_head.weight" and tied:
            continue  # one copy: llama.cpp (and transformers) reuse token_embd for the output
        if "rotary_emb" in hf_name:
            continue
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise ValueError(f"no GGUF name for {hf_name!r}; this model has layers llama lacks.")
        array = tensor.detach().float().cpu().numpy()
        if hf_name.endswith("q_proj.weight"):
            array = permute_for_gguf(array, config.num_attention_heads)
        elif hf_name.endswith("k_proj.weight"):
            array = permute_for_gguf(array, config.num_key_value_heads)
        if dtype == "f16" and array.ndim == 2:
            array = array.astype(np.float16)
        yield name, np.ascontiguousarray(array)


def export_gguf(
    model,
    tokenizer,
    path: str | os.PathLike,
    *,
    dtype: str = "f16",
    name: str | None = None,
    pre_tokenizer: str = "smollm",
) -> Path:
    """Write a (merged) Llama model and its tokenizer to one GGUF file; return its path.

    2-D weights are stored in `dtype` ("f16" or "f32"), norms in f32, as llama.cpp does.
    `pre_tokenizer` is llama.cpp's name for the text splitting rule ("smollm" for the course
    tokenizer); transformers ignores it.
    """
    path = _check_export(model, tokenizer, path, dtype)
    path.parent.mkdir(parents=True, exist_ok=True)
    name = name or str(getattr(model.config, "_name_or_path", "") or "model").split("/")[-1]
    writer = gguf.GGUFWriter(path, "llama")
    try:
        _write_config(writer, model.config, name, dtype)
        _write_tokenizer(writer, tokenizer, pre_tokenizer)
        for tensor_name, array in _gguf_tensors(model, dtype):
            writer.add_tensor(tensor_name, array)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    except BaseException:
        writer.close()
        path.unlink(missing_ok=True)  # no half-written file is left behind
        raise
    writer.close()
    return path


def load_gguf(
    path: str | os.PathLike,
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
):
    """Load a GGUF file with plain transformers; return (model, tokenizer) on `device`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist; write it first with export_gguf().")
    device = env.pick_device(device) if device is not None else env.pick_device()
    dtype = dtype or env.default_dtype(device)
    tokenizer = AutoTokenizer.from_pretrained(
        path.parent, gguf_file=path.name, clean_up_tokenization_spaces=False
    )
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype)
    # transformers' GGUF tokenizer names the wrong end token; take the model's (see assets)
    align_special_tokens(tokenizer, model.generation_config)
    return model.to(device), tokenizer


def gguf_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """Return a GGUF file's scalar keys, array lengths, tensor count and tensor types."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist; pass the path of a .gguf file.")
    reader = gguf.GGUFReader(path)
    keys: dict[str, Any] = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        value = field.contents()
        keys[key] = f"[{len(value)} items]" if isinstance(value, list) else value
    types: dict[str, int] = {}
    for tensor in reader.tensors:
        types[tensor.tensor_type.name] = types.get(tensor.tensor_type.name, 0) + 1
    return {
        "keys": keys,
        "tensors": len(reader.tensors),
        "tensor_types": types,
        "tensor_names": [t.name for t in reader.tensors],
    }
