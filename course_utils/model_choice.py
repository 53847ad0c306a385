"""Choosing a base model: what it costs to fine-tune, to serve and to run, and its card's facts.

Lesson 01 (section 8, "Choosing a base model").

Three kinds of number decide which model a project starts from:

* **memory to fine-tune**: :func:`course_utils.memory.estimate` (full, LoRA, QLoRA);
* **memory to serve**: the weights in the format they are served in (bf16, int8 or 4-bit) plus
  the **KV cache**, the keys and values every layer keeps for each token of the context:
  ``2 x layers x kv_heads x head_dim x tokens x bytes`` (:func:`kv_cache_bytes`);
* **speed**: generating one token reads every weight once, and at batch 1 that reading, not the
  arithmetic, sets the pace (decoding is *memory-bound*). So seconds per token ≈ bytes of weights
  / memory bandwidth (:func:`decode_tokens_per_second`). The lesson measures one model and
  calibrates the bandwidth on it (:func:`effective_bandwidth`); the estimate ignores the KV
  cache's reads, the arithmetic, and the fixed cost of each step (Python, kernel launches), which
  a small model's measurement folds into its bandwidth.

The shapes of the models that :data:`course_utils.memory.PRESETS` lacks are in :data:`CONFIGS`,
each from the model's own ``config.json`` (:data:`CONFIG_SOURCES`); licence, context length and
released variants are in :data:`MODEL_CARDS`, each with its source. Sizes in "GB" are GiB, as in
:mod:`course_utils.memory`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from .checks import one_of, positive_int, positive_number
from .memory import (
    BYTES_PER_DTYPE,
    PRESETS,
    get_config,
    linear_layer_shapes,
    param_groups,
    weight_bytes,
)

__all__ = [
    "CONFIGS",
    "CONFIG_SOURCES",
    "MODEL_CARDS",
    "SERVING_FORMATS",
    "T4_BANDWIDTH",
    "T4_BANDWIDTH_SOURCE",
    "DecodeSpeed",
    "ModelCard",
    "config_of",
    "decode_tokens_per_second",
    "effective_bandwidth",
    "kv_cache_bytes",
    "measure_decode",
    "serving_bytes",
    "serving_weight_bytes",
]

#: Shapes of models that memory.PRESETS does not hold, from each model's config.json.
CONFIGS: dict[str, dict] = {
    "SmolLM2-360M": {
        "vocab_size": 49152,
        "hidden_size": 960,
        "intermediate_size": 2560,
        "num_hidden_layers": 32,
        "num_attention_heads": 15,
        "num_key_value_heads": 5,
        "tie_word_embeddings": True,
    },
    "SmolLM2-1.7B": {
        "vocab_size": 49152,
        "hidden_size": 2048,
        "intermediate_size": 8192,
        "num_hidden_layers": 24,
        "num_attention_heads": 32,
        "num_key_value_heads": 32,
        "tie_word_embeddings": True,
    },
    "Llama-3.2-3B": {
        "vocab_size": 128256,
        "hidden_size": 3072,
        "intermediate_size": 8192,
        "num_hidden_layers": 28,
        "num_attention_heads": 24,
        "num_key_value_heads": 8,
        "head_dim": 128,
        "tie_word_embeddings": True,
    },
}

#: Where each of CONFIGS' values comes from: the instruct model's config.json on the hub.
CONFIG_SOURCES: dict[str, str] = {
    name: f"https://huggingface.co/{repo}/blob/main/config.json"
    for name, repo in {
        "SmolLM2-360M": "HuggingFaceTB/SmolLM2-360M-Instruct",
        "SmolLM2-1.7B": "HuggingFaceTB/SmolLM2-1.7B-Instruct",
        "Llama-3.2-3B": "meta-llama/Llama-3.2-3B-Instruct",
    }.items()
}


@dataclass(frozen=True)
class ModelCard:
    """What a model's card says: the repositories, the licence and the context length."""

    base: str  # hub id of the pre-trained (base) model
    instruct: str  # hub id of the instruction-tuned (chat) model
    licence: str
    context_tokens: int  # the longest input the model was built for
    source: str  # the model card these facts come from


#: The candidates of lesson 01, smallest first; each name is in memory.PRESETS or CONFIGS.
MODEL_CARDS: dict[str, ModelCard] = {
    "SmolLM2-135M": ModelCard(
        "HuggingFaceTB/SmolLM2-135M",
        "HuggingFaceTB/SmolLM2-135M-Instruct",
        "Apache-2.0",
        8192,
        "https://huggingface.co/HuggingFaceTB/SmolLM2-135M-Instruct",
    ),
    "SmolLM2-360M": ModelCard(
        "HuggingFaceTB/SmolLM2-360M",
        "HuggingFaceTB/SmolLM2-360M-Instruct",
        "Apache-2.0",
        8192,
        "https://huggingface.co/HuggingFaceTB/SmolLM2-360M-Instruct",
    ),
    "SmolLM2-1.7B": ModelCard(
        "HuggingFaceTB/SmolLM2-1.7B",
        "HuggingFaceTB/SmolLM2-1.7B-Instruct",
        "Apache-2.0",
        8192,
        "https://huggingface.co/HuggingFaceTB/SmolLM2-1.7B-Instruct",
    ),
    "Llama-3.2-1B": ModelCard(
        "meta-llama/Llama-3.2-1B",
        "meta-llama/Llama-3.2-1B-Instruct",
        "Llama 3.2 Community License",
        131072,
        "https://huggingface.co/meta-llama/Llama-3.2-1B-Instruct",
    ),
    "Llama-3.2-3B": ModelCard(
        "meta-llama/Llama-3.2-3B",
        "meta-llama/Llama-3.2-3B-Instruct",
        "Llama 3.2 Community License",
        131072,
        "https://huggingface.co/meta-llama/Llama-3.2-3B-Instruct",
    ),
    "Mistral-7B": ModelCard(
        "mistralai/Mistral-7B-v0.1",
        "mistralai/Mistral-7B-Instruct-v0.2",
        "Apache-2.0",
        32768,
        "https://huggingface.co/mistralai/Mistral-7B-Instruct-v0.2",
    ),
    "Llama-3-70B": ModelCard(
        "meta-llama/Meta-Llama-3-70B",
        "meta-llama/Meta-Llama-3-70B-Instruct",
        "Meta Llama 3 Community License",
        8192,
        "https://huggingface.co/meta-llama/Meta-Llama-3-70B-Instruct",
    ),
}

#: The formats weights are served in: bf16 as trained; int8 (bitsandbytes LLM.int8: one byte per
#: linear weight plus an fp32 scale per output row); 4-bit (NF4 with double quantization, as
#: QLoRA stores them). Embeddings, norms and an untied LM head stay bf16 in all three.
SERVING_FORMATS = ("bf16", "int8", "4-bit")

#: Peak memory bandwidth of an NVIDIA T4 (Colab's free GPU), bytes per second.
T4_BANDWIDTH = 320e9
T4_BANDWIDTH_SOURCE = "https://www.nvidia.com/en-us/data-center/tesla-t4/ (up to 320 GB/s)"


def config_of(config: object) -> dict:
    """A checked config: a name from CONFIGS or memory.PRESETS, a dict or a transformers config."""
    if isinstance(config, str):
        if config in CONFIGS:
            return get_config(CONFIGS[config])
        if config.lower() not in {name.lower() for name in PRESETS}:
            known = sorted([*PRESETS, *CONFIGS])
            raise ValueError(f"unknown model {config!r}; use one of {known} or pass a config.")
    return get_config(config)


def kv_cache_bytes(config: object, tokens: int, batch: int = 1, dtype: str = "bf16") -> int:
    """Bytes of the KV cache: a key and a value per layer, KV head and token, in ``dtype``."""
    cfg = config_of(config)
    tokens = positive_int(tokens, "tokens", "tokens=4096")
    batch = positive_int(batch, "batch", "batch=1")
    dtype = one_of(dtype, "dtype", BYTES_PER_DTYPE)
    per_token = 2 * cfg["num_hidden_layers"] * cfg["num_key_value_heads"] * cfg["head_dim"]
    return per_token * tokens * batch * BYTES_PER_DTYPE[dtype]


def serving_weight_bytes(config: object, weights: str = "bf16") -> int:
    """Bytes of the weights served in one of SERVING_FORMATS (see there)."""
    cfg = config_of(config)
    weights = one_of(weights, "weights", SERVING_FORMATS)
    if weights == "bf16":
        return weight_bytes(cfg, "bf16")
    if weights == "4-bit":
        return weight_bytes(cfg, "bf16", quantization="nf4")
    groups = param_groups(cfg)
    rows = cfg["num_hidden_layers"] * sum(d_out for _, d_out in linear_layer_shapes(cfg).values())
    rest = sum(groups.values()) - groups["linear"]
    return groups["linear"] * 1 + rows * 4 + rest * BYTES_PER_DTYPE["bf16"]


def serving_bytes(
    config: object, weights: str = "bf16", context_tokens: int = 4096, batch: int = 1
) -> int:
    """Bytes to serve a model: its weights in ``weights`` plus a bf16 KV cache of the context."""
    return serving_weight_bytes(config, weights) + kv_cache_bytes(config, context_tokens, batch)


def decode_tokens_per_second(weight_bytes_read: float, bandwidth: float) -> float:
    """Tokens per second if each token reads ``weight_bytes_read`` at ``bandwidth`` bytes/s."""
    weight_bytes_read = positive_number(weight_bytes_read, "weight_bytes_read", "270e6")
    bandwidth = positive_number(bandwidth, "bandwidth", "320e9 (bytes per second)")
    return bandwidth / weight_bytes_read


def effective_bandwidth(weight_bytes_read: float, tokens_per_second: float) -> float:
    """Bytes per second a measured decode speed implies: weights read per token x tokens/s."""
    weight_bytes_read = positive_number(weight_bytes_read, "weight_bytes_read", "538e6")
    tokens_per_second = positive_number(tokens_per_second, "tokens_per_second", "10.0")
    return weight_bytes_read * tokens_per_second


@dataclass(frozen=True)
class DecodeSpeed:
    """One timed greedy generation: the prompt, the first token, and the tokens after it."""

    prompt_tokens: int
    new_tokens: int
    first_token_seconds: float  # reading the prompt (prefill) and the first new token
    total_seconds: float  # all new tokens

    @property
    def tokens_per_second(self) -> float:
        """Decode speed: the tokens after the first, per second (the prompt's cost left out)."""
        return (self.new_tokens - 1) / max(self.total_seconds - self.first_token_seconds, 1e-9)


def _synchronize(device: torch.device) -> None:
    """Wait for the GPU, so that a timer reads the work done, not the work queued."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed_generate(model, inputs: dict, new_tokens: int) -> float:
    """Seconds for one greedy generate of exactly ``new_tokens`` tokens."""
    _synchronize(model.device)
    started = time.perf_counter()
    output = model.generate(
        **inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False
    )
    _synchronize(model.device)
    seconds = time.perf_counter() - started
    made = output.shape[1] - inputs["input_ids"].shape[1]
    if made != new_tokens:
        raise RuntimeError(f"generate made {made} tokens instead of {new_tokens}; check the model.")
    return seconds


@torch.no_grad()
def measure_decode(model, tokenizer, prompt: str, new_tokens: int = 32) -> DecodeSpeed:
    """Time a greedy generation of ``new_tokens`` tokens after a chat prompt (after a warm-up).

    One token alone times the prompt's cost; the tokens after it are the decode speed.
    """
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError(f"prompt must be a non-empty string (got {prompt!r}); try 'Hello'.")
    new_tokens = positive_int(new_tokens, "new_tokens", "new_tokens=32")
    if new_tokens < 2:
        raise ValueError(f"new_tokens must be at least 2 (got {new_tokens}); try new_tokens=32.")
    messages = [{"role": "user", "content": prompt}]
    inputs = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    inputs = {key: value.to(model.device) for key, value in inputs.items()}
    was_training = model.training
    model.eval()
    try:
        _timed_generate(model, inputs, 2)  # warm-up: first calls allocate and pick kernels
        first = _timed_generate(model, inputs, 1)
        total = _timed_generate(model, inputs, new_tokens)
    finally:
        model.train(was_training)
    return DecodeSpeed(inputs["input_ids"].shape[1], new_tokens, first, total)
