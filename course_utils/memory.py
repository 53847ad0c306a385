"""How much GPU memory does fine-tuning need? A back-of-the-envelope estimator.

Lessons 01, 03 and 07.

Training memory has four parts:

* **weights** - every parameter, trainable or frozen, in its storage format;
* **gradients** - one per *trainable* parameter, in the trainable dtype;
* **optimizer states** - AdamW keeps two running averages (momentum and variance) per
  trainable parameter, in fp32: 8 bytes. 8-bit AdamW (bitsandbytes) stores them in 1 byte each
  plus a small per-block scale; plain SGD keeps nothing;
* **activations** - what the forward pass saves for the backward pass; it grows with
  ``batch * seq_len`` and with the number of layers, not with the optimizer.

The famous rule for full fine-tuning in fp32 with AdamW follows from the first three:
4 (weights) + 4 (gradients) + 8 (Adam) = **16 bytes per parameter**, so a 7B model needs
~112 GB before a single activation is stored. LoRA freezes the base model and trains two
small matrices per targeted linear layer, ``r * (d_in + d_out)`` parameters, so gradients and
optimizer states almost vanish. QLoRA additionally stores the frozen linear weights in NF4
with double quantization: ~4.127 bits per weight (see :mod:`course_utils.quant`).

Sizes in "GB" in this module are GiB (2**30 bytes), the unit ``torch.cuda`` reports.
The numbers are estimates for planning, not a promise: the CUDA context, the allocator's
fragmentation and framework buffers add a few hundred MB to a few GB on a real GPU.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from itertools import chain

import torch

from .checks import one_of, positive_int
from .quant import double_quant_bits_per_param

__all__ = [
    "BYTES_PER_DTYPE",
    "GB",
    "GPUS",
    "LLAMA_LINEAR_LAYERS",
    "DEFAULT_LOSS",
    "LOSSES",
    "METHODS",
    "MLPS",
    "OPTIMIZER_BYTES_PER_PARAM",
    "PRESETS",
    "MemoryEstimate",
    "count_params",
    "estimate",
    "fits",
    "get_config",
    "linear_layer_shapes",
    "loss_chunk_tokens",
    "lora_trainable_params",
    "measure_model_bytes",
    "param_groups",
    "preset_table",
    "weight_bytes",
]

#: The three ways to fine-tune that the course compares, in its order (lessons 01, 05-07).
METHODS = ("full", "lora", "qlora")
#: Bytes in one GB as used throughout this module (a GiB).
GB = 1024**3

#: Bytes per value for the dtypes training uses.
BYTES_PER_DTYPE = {"fp32": 4, "fp16": 2, "bf16": 2}

#: Optimizer state bytes per trainable parameter. AdamW: two fp32 moments. adamw_8bit: two
#: 1-byte moments plus one fp32 scale per block of 256 values for each of them.
OPTIMIZER_BYTES_PER_PARAM = {"adamw": 8.0, "adamw_8bit": 2 * (1 + 4 / 256), "sgd": 0.0}

#: How each loss holds the fp32 logits at its peak: the tokens of one chunk (None: all of them)
#: and the bytes per token and vocabulary entry, measured against the libraries by the tests.
#: standard: transformers' cross-entropy over the full logits (logits, log-probabilities and
#: their gradient); fused: the course's own (`course_utils.fused_loss`, lab 10), 256 labelled tokens per
#: chunk, their logits overwritten by the softmax with 32 rows of probabilities beside them
#: (4 + 4 x 32 / 256 = 4.5 bytes per entry), the gradient formed in the forward pass (and,
#: when the head trains, its weight's gradient kept until the backward pass); chunked_nll:
#: TRL's default loss, 256 labelled tokens per chunk, recomputed in the backward pass with the
#: probabilities for the entropy TRL logs; unsloth_cpu: Unsloth's CPU cross-entropy, chunks of
#: 16 Mi logits whose gradient it forms in the forward pass (a SmolLM2 chunk: 341 tokens).
#: The loss `estimate` assumes unless told: what TRL's SFTTrainer does by default, the path the
#: labs (05-07, 10-15) train with.
DEFAULT_LOSS = "chunked_nll"
LOSSES = {
    "standard": {"chunk_tokens": None, "bytes_per_entry": 12},
    "fused": {"chunk_tokens": 256, "bytes_per_entry": 4.5, "keeps_head_gradient": True},
    "chunked_nll": {"chunk_tokens": 256, "bytes_per_entry": 16},
    "unsloth_cpu": {"chunk_elements": 16 * 2**20, "bytes_per_entry": 8},
}

#: How an MLP keeps its SwiGLU for the backward pass, as tensors of intermediate_size per token
#: and layer: standard: gate, up, SiLU(gate) and their product (two PyTorch ops);
#: swiglu: the labs' path (`course_utils.swiglu`): only gate and up, SiLU(gate) and the product
#: recomputed from them in the backward pass.
MLPS = {"standard": 4, "swiglu": 2}

#: The linear layers inside one Llama-style decoder layer (what PEFT's "all-linear" targets).
LLAMA_LINEAR_LAYERS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

#: Model shapes as plain dicts; each one is valid ``transformers.LlamaConfig(**preset)`` input.
PRESETS: dict[str, dict] = {
    "SmolLM2-135M": {
        "vocab_size": 49152,
        "hidden_size": 576,
        "intermediate_size": 1536,
        "num_hidden_layers": 30,
        "num_attention_heads": 9,
        "num_key_value_heads": 3,
        "tie_word_embeddings": True,
    },
    "Llama-3.2-1B": {
        "vocab_size": 128256,
        "hidden_size": 2048,
        "intermediate_size": 8192,
        "num_hidden_layers": 16,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "head_dim": 64,
        "tie_word_embeddings": True,
    },
    "Llama-2-7B": {
        "vocab_size": 32000,
        "hidden_size": 4096,
        "intermediate_size": 11008,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 32,
        "tie_word_embeddings": False,
    },
    "Mistral-7B": {
        "vocab_size": 32000,
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "tie_word_embeddings": False,
    },
    "Llama-3-70B": {
        "vocab_size": 128256,
        "hidden_size": 8192,
        "intermediate_size": 28672,
        "num_hidden_layers": 80,
        "num_attention_heads": 64,
        "num_key_value_heads": 8,
        "tie_word_embeddings": False,
    },
}

#: GPU memory in GB for a few common cards.
GPUS: dict[str, float] = {
    "T4 16 GB": 16,
    "A100 40 GB": 40,
    "A100 80 GB": 80,
    "consumer 8 GB": 8,
    "12 GB": 12,
    "24 GB": 24,
}

_REQUIRED_KEYS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
)


# --------------------------------------------------------------------------------------------
# Reading a model's shape
# --------------------------------------------------------------------------------------------


def get_config(config: object) -> dict:
    """Turn a preset name, a plain dict or a transformers config into a checked plain dict."""
    if isinstance(config, str):
        names = {name.lower(): name for name in PRESETS}
        if config.lower() not in names:
            raise ValueError(
                f"unknown preset {config!r}; use one of {sorted(PRESETS)} or pass a config."
            )
        config = PRESETS[names[config.lower()]]
    elif hasattr(config, "to_dict") and callable(config.to_dict):  # a transformers config
        config = config.to_dict()
    if not isinstance(config, dict):
        raise TypeError(
            f"expected a preset name, a dict or a transformers PretrainedConfig, got "
            f"{type(config).__name__}; pass e.g. 'SmolLM2-135M' (or an int parameter count)."
        )
    missing = [key for key in _REQUIRED_KEYS if config.get(key) is None]
    if missing:
        raise ValueError(
            f"config lacks {missing}; only Llama-style decoder configs are supported, so pass "
            "a parameter count (an int) for other architectures."
        )
    cfg = dict(config)
    for key in _REQUIRED_KEYS:
        if isinstance(cfg[key], bool) or not isinstance(cfg[key], int) or cfg[key] <= 0:
            raise ValueError(f"config[{key!r}] must be a positive int, got {cfg[key]!r}.")
    if cfg.get("num_key_value_heads") is None:
        cfg["num_key_value_heads"] = cfg["num_attention_heads"]
    if cfg.get("head_dim") is None:
        cfg["head_dim"] = cfg["hidden_size"] // cfg["num_attention_heads"]
    cfg.setdefault("tie_word_embeddings", False)
    cfg.setdefault("attention_bias", False)
    cfg.setdefault("mlp_bias", False)
    return cfg


def linear_layer_shapes(config: object) -> dict[str, tuple[int, int]]:
    """``(d_in, d_out)`` of each linear layer in one decoder layer of a Llama-style model."""
    cfg = get_config(config)
    h, inter = cfg["hidden_size"], cfg["intermediate_size"]
    q_dim = cfg["num_attention_heads"] * cfg["head_dim"]
    kv_dim = cfg["num_key_value_heads"] * cfg["head_dim"]
    return {
        "q_proj": (h, q_dim),
        "k_proj": (h, kv_dim),
        "v_proj": (h, kv_dim),
        "o_proj": (q_dim, h),
        "gate_proj": (h, inter),
        "up_proj": (h, inter),
        "down_proj": (inter, h),
    }


def _param_groups(config: object) -> dict[str, int]:
    """Parameter counts of a Llama-style model split into embeddings, linear layers and rest."""
    cfg = get_config(config)
    h, n_layers, vocab = cfg["hidden_size"], cfg["num_hidden_layers"], cfg["vocab_size"]
    shapes = linear_layer_shapes(cfg)
    linear = sum(d_in * d_out for d_in, d_out in shapes.values())
    biases = 0
    if cfg["attention_bias"]:
        biases += sum(shapes[name][1] for name in ("q_proj", "k_proj", "v_proj", "o_proj"))
    if cfg["mlp_bias"]:
        biases += sum(shapes[name][1] for name in ("gate_proj", "up_proj", "down_proj"))
    return {
        "embeddings": vocab * h,
        "linear": n_layers * linear,  # what QLoRA quantizes to NF4
        "other": n_layers * (biases + 2 * h) + h,  # biases, 2 RMSNorms per layer, final norm
        "lm_head": 0 if cfg["tie_word_embeddings"] else vocab * h,
    }


def count_params(config: object) -> int:
    """Number of parameters of a Llama-style model, from its config (tied embeddings once)."""
    return sum(_param_groups(config).values())


def preset_table() -> list[dict]:
    """Name, parameter count and size in fp16 of every preset."""
    return [
        {"name": name, "params": count_params(cfg), "fp16_gb": count_params(cfg) * 2 / GB}
        for name, cfg in PRESETS.items()
    ]


def _normalise_targets(targets: object) -> tuple[str, ...]:
    """Turn ``"all-linear"`` or names like ``["q", "v_proj"]`` into full layer names."""
    if targets == "all-linear":
        return LLAMA_LINEAR_LAYERS
    if isinstance(targets, str) or not isinstance(targets, (list, tuple, set)):
        raise TypeError(
            f"targets must be 'all-linear' or a list of layer names, got {targets!r}; e.g. "
            "['q_proj', 'v_proj']."
        )
    names = []
    for name in targets:
        full = name if str(name).endswith("_proj") else f"{name}_proj"
        if full not in LLAMA_LINEAR_LAYERS:
            raise ValueError(
                f"unknown target {name!r}; choose from {list(LLAMA_LINEAR_LAYERS)} or 'all-linear'."
            )
        names.append(full)
    if not names:
        raise ValueError("targets is empty; pass 'all-linear' or at least one layer name.")
    return tuple(dict.fromkeys(names))


def lora_trainable_params(config: object, r: int = 16, targets: object = "all-linear") -> int:
    """LoRA parameters: ``r * (d_in + d_out)`` for each targeted linear layer, in every layer."""
    if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
        raise ValueError(f"r must be a positive int, got {r!r}; typical values are 8, 16 or 64.")
    cfg = get_config(config)
    shapes = linear_layer_shapes(cfg)
    per_layer = sum(r * sum(shapes[name]) for name in _normalise_targets(targets))
    return cfg["num_hidden_layers"] * per_layer


# --------------------------------------------------------------------------------------------
# The estimate
# --------------------------------------------------------------------------------------------


@dataclass
class MemoryEstimate:
    """Bytes needed for one training setup, split by what they are used for.

    ``n_params`` counts the base model; ``trainable_params`` the parameters that get gradients
    (all of them for full fine-tuning, only the adapters for LoRA/QLoRA).
    """

    weights: int
    gradients: int
    optimizer: int
    activations: int
    n_params: int
    trainable_params: int
    method: str
    dtype: str
    notes: list[str] = field(default_factory=list)

    #: Short-lived copies made while the step runs (AdamW's per-tensor scratch, the tied
    #: embedding's gradient being summed): two copies of the largest trainable tensor.
    temporaries: int = 0

    #: Whether ``optimizer`` includes an fp32 master copy of the weights (mixed precision):
    #: then a sharded optimizer (ZeRO, FSDP) updates that copy, not the weights themselves
    #: (`course_utils.sharding`, lesson 09). Left out of the repr and of comparisons.
    master_weights: bool = field(default=False, repr=False, compare=False)

    @property
    def total(self) -> int:
        """The peak: weights and optimizer states plus the larger of activations and gradients.

        The backward pass frees the saved activations layer by layer while it writes the
        gradients, so the two never peak together (measured: python -m course_tools.bench memory).
        """
        extra = max(self.activations, self.gradients + self.temporaries)
        return self.weights + self.optimizer + extra

    def breakdown(self) -> dict[str, int]:
        """Bytes per part, plus the total."""
        return {
            "weights": self.weights,
            "gradients": self.gradients,
            "optimizer": self.optimizer,
            "activations": self.activations,
            "total": self.total,
        }

    def to_gb(self) -> dict[str, float]:
        """GB (GiB) per part, plus the total."""
        return {name: value / GB for name, value in self.breakdown().items()}

    def __str__(self) -> str:
        """A small table for printing in a notebook."""
        lines = [f"{self.method} / {self.dtype}: {self.n_params:,} params, "]
        lines[0] += f"{self.trainable_params:,} trainable"
        lines += [f"  {name:<12}{gb:8.2f} GB" for name, gb in self.to_gb().items()]
        lines += [f"  note: {note}" for note in self.notes]
        return "\n".join(lines)


def loss_chunk_tokens(loss: str, vocab_size: int) -> int | None:
    """Tokens whose logits `loss` (a key of LOSSES) holds at once; None: every token's."""
    rule = LOSSES[one_of(loss, "loss", LOSSES)]
    vocab_size = positive_int(vocab_size, "vocab_size", "vocab_size=49152")
    if "chunk_elements" in rule:
        return max(16, rule["chunk_elements"] // vocab_size)  # unsloth_zoo's own rounding
    return rule["chunk_tokens"]


def _logit_bytes(vocab_size: int, tokens: int, loss: str) -> int:
    """Bytes of fp32 logits (and what the loss derives from them) at the loss's peak."""
    chunk = loss_chunk_tokens(loss, vocab_size)
    held = tokens if chunk is None else min(tokens, chunk)
    return int(held * vocab_size * LOSSES[loss]["bytes_per_entry"])


def _activation_bytes(
    cfg: dict,
    batch: int,
    seq_len: int,
    dtype_bytes: int,
    checkpointing: bool,
    eager: bool,
    loss: str = "standard",
    mlp: str = "standard",
) -> int:
    """A simple estimate of the activations autograd keeps for the backward pass.

    Per token and decoder layer a Llama layer saves roughly: the inputs and outputs of its two
    RMSNorms (4 x hidden), q, k and v before and after the rotary embedding and the attention
    output (3 x q_dim + 3 x kv_dim), and in the MLP gate, up, SiLU(gate) and their product
    (4 x intermediate; 2 x with ``mlp="swiglu"``, see MLPS). Eager attention also keeps the scores and the softmax
    (2 x heads x seq_len per token); SDPA/flash attention does not. The loss keeps the fp32
    log-probabilities (4 bytes per token and vocabulary entry), and the first two steps of the
    backward pass add their gradient and the logits' gradient, both fp32: 12 bytes at the peak,
    whatever the compute dtype (transformers upcasts the logits for the loss). A chunked
    ``loss`` (see LOSSES) holds the logits of one chunk at a time. With gradient checkpointing
    only each layer's input (hidden) is kept; on top of it come first the loss's logits, then
    one layer's activations while it is recomputed, so the larger of the two counts.
    """
    tokens = batch * seq_len
    h, inter = cfg["hidden_size"], cfg["intermediate_size"]
    q_dim = cfg["num_attention_heads"] * cfg["head_dim"]
    kv_dim = cfg["num_key_value_heads"] * cfg["head_dim"]
    per_layer = 4 * h + 3 * q_dim + 3 * kv_dim + MLPS[mlp] * inter
    if eager:
        per_layer += 2 * cfg["num_attention_heads"] * seq_len
    layers = cfg["num_hidden_layers"]
    logits = _logit_bytes(cfg["vocab_size"], tokens, loss)
    if checkpointing:
        kept = tokens * layers * h * dtype_bytes
        return kept + max(tokens * per_layer * dtype_bytes, logits)
    return tokens * layers * per_layer * dtype_bytes + logits


def estimate(
    config_or_params: object,
    method: str = "full",
    dtype: str = "fp32",
    batch: int = 1,
    seq_len: int = 512,
    optimizer: str = "adamw",
    lora_r: int = 16,
    lora_targets: object = "all-linear",
    *,
    trainable_params: int | None = None,
    gradient_checkpointing: bool = False,
    attention: str = "sdpa",
    master_weights: bool = False,
    adapter_dtype: str = "fp32",
    loss: str = DEFAULT_LOSS,
    mlp: str = "standard",
) -> MemoryEstimate:
    """Estimate training memory for full fine-tuning, LoRA or QLoRA.

    ``config_or_params`` is a parameter count (int), a transformers config, a dict or a preset
    name (see :data:`PRESETS`). With a bare count the activations are unknown (reported as 0)
    and LoRA needs ``trainable_params``. ``dtype`` is the dtype of the (frozen) weights and of
    the activations; LoRA adapters are kept in ``adapter_dtype`` (PEFT keeps them in fp32).
    ``master_weights=True`` adds the fp32 copy that mixed-precision training keeps next to
    fp16/bf16 weights (2 + 2 + 4 + 8 = 16 bytes per parameter again). ``loss`` says how the
    loss holds the logits (LOSSES): ``"chunked_nll"`` (the default: TRL's SFTTrainer, the labs'
    path), ``"standard"`` (all of them: transformers' own loss, a plain Trainer), ``"fused"``
    (`course_utils.fused_loss`, lab 10) or ``"unsloth_cpu"``; ``mlp`` how the MLP keeps its
    SwiGLU (MLPS): ``"standard"`` (the model's own) or ``"swiglu"`` (`course_utils.swiglu`).
    """
    method = one_of(method, "method", METHODS)
    dtype = one_of(dtype, "dtype", BYTES_PER_DTYPE)
    optimizer = one_of(optimizer, "optimizer", OPTIMIZER_BYTES_PER_PARAM)
    adapter_dtype = one_of(adapter_dtype, "adapter_dtype", BYTES_PER_DTYPE)
    attention = one_of(attention, "attention", {"sdpa", "eager"})
    batch = positive_int(batch, "batch", "batch=4")
    seq_len = positive_int(seq_len, "seq_len", "seq_len=512")
    loss = one_of(loss, "loss", LOSSES)
    mlp = one_of(mlp, "mlp", MLPS)
    notes: list[str] = []

    if isinstance(config_or_params, bool):
        raise TypeError("config_or_params must be an int, a config or a preset name, not a bool.")
    if isinstance(config_or_params, int):
        if config_or_params <= 0:
            raise ValueError(f"the parameter count must be positive, got {config_or_params}.")
        cfg = None
        n_params = config_or_params
        groups = {"linear": n_params, "embeddings": 0, "other": 0, "lm_head": 0}
        notes.append("activations not estimated: pass a config or preset name to include them")
        if method == "qlora":
            notes.append("all parameters counted as NF4; real QLoRA keeps embeddings in dtype")
    else:
        cfg = get_config(config_or_params)
        groups = _param_groups(cfg)
        n_params = sum(groups.values())

    w_bytes = BYTES_PER_DTYPE[dtype]
    opt_bytes = OPTIMIZER_BYTES_PER_PARAM[optimizer]
    if method == "full":
        if trainable_params is not None:
            raise ValueError("trainable_params is only for LoRA/QLoRA; leave it out for full.")
        trainable = n_params
        weights = n_params * w_bytes
        gradients = n_params * w_bytes
        optimizer_bytes = n_params * opt_bytes
        if master_weights and dtype != "fp32":
            optimizer_bytes += n_params * 4
            notes.append("fp32 master weights counted with the optimizer states")
    else:
        if trainable_params is not None:
            trainable = positive_int(
                trainable_params, "trainable_params", "trainable_params=1_000_000"
            )
        elif cfg is None:
            raise ValueError(
                "LoRA needs the layer shapes: pass a config or preset name instead of a bare "
                "parameter count, or give trainable_params=..."
            )
        else:
            trainable = lora_trainable_params(cfg, lora_r, lora_targets)
        a_bytes = BYTES_PER_DTYPE[adapter_dtype]
        if method == "lora":
            frozen = n_params * w_bytes
        else:
            nf4_bits = double_quant_bits_per_param()
            unquantized = n_params - groups["linear"]
            frozen = groups["linear"] * nf4_bits / 8 + unquantized * w_bytes
        weights = frozen + trainable * a_bytes
        gradients = trainable * a_bytes
        optimizer_bytes = trainable * opt_bytes

    if method == "full" and cfg is not None:
        h = cfg["hidden_size"]
        largest = max(cfg["vocab_size"] * h, cfg["intermediate_size"] * h)
        temporaries = 2 * largest * w_bytes
    else:  # LoRA adapters are tiny; a bare parameter count gives no shapes
        temporaries = 0
    if cfg is None:
        activations = 0
    else:
        activations = _activation_bytes(
            cfg, batch, seq_len, w_bytes, gradient_checkpointing, attention == "eager", loss, mlp
        )
        if method == "full" and LOSSES[loss].get("keeps_head_gradient"):
            activations += cfg["vocab_size"] * cfg["hidden_size"] * 4  # fp32, until backward
    return MemoryEstimate(
        weights=math.ceil(weights),
        gradients=math.ceil(gradients),
        optimizer=math.ceil(optimizer_bytes),
        activations=math.ceil(activations),
        n_params=n_params,
        trainable_params=trainable,
        method=method,
        dtype=dtype,
        notes=notes,
        temporaries=temporaries,
        master_weights=method == "full" and master_weights and dtype != "fp32",
    )


def _gpu_gb(gpu: str | float) -> float:
    """Return a GPU's memory in GB from a name in GPUS or a positive number, else raise."""
    if isinstance(gpu, str):
        if gpu not in GPUS:
            raise ValueError(f"unknown GPU {gpu!r}; use one of {list(GPUS)} or a size in GB.")
        return GPUS[gpu]
    if isinstance(gpu, (int, float)) and not isinstance(gpu, bool) and gpu > 0:
        return gpu
    raise TypeError(f"gpu must be a name from GPUS or a positive number of GB, got {gpu!r}.")


def fits(estimate: MemoryEstimate | int, gpu: str | float, usable_fraction: float = 0.9) -> bool:
    """Whether the estimate fits in ``usable_fraction`` of a GPU's memory (name in GPUS or GB).

    The default keeps 10 % back for the CUDA context, the allocator and fragmentation.
    """
    if isinstance(estimate, MemoryEstimate):
        needed = estimate.total
    elif isinstance(estimate, (int, float)) and not isinstance(estimate, bool) and estimate >= 0:
        needed = estimate
    else:
        raise TypeError("estimate must be a MemoryEstimate or a number of bytes; call estimate().")
    gpu_gb = _gpu_gb(gpu)
    if not 0 < usable_fraction <= 1:
        raise ValueError(f"usable_fraction must be in (0, 1], got {usable_fraction}; e.g. 0.9.")
    return needed <= gpu_gb * GB * usable_fraction


# --------------------------------------------------------------------------------------------
# Measuring a real model
# --------------------------------------------------------------------------------------------


def _quant_state_bytes(tensor: torch.Tensor) -> int:
    """Bytes of the side information a bitsandbytes parameter carries (absmax, code, SCB)."""
    total = 0
    state = getattr(tensor, "quant_state", None)
    if state is not None:
        for value in state.as_dict(packed=False).values():
            if isinstance(value, torch.Tensor):
                total += value.numel() * value.element_size()
        if getattr(state, "nested", False):
            total += 4  # the fp32 offset subtracted before double quantization
    scb = getattr(tensor, "SCB", None)  # row scales of bitsandbytes' 8-bit Int8Params
    if isinstance(scb, torch.Tensor):
        total += scb.numel() * scb.element_size()
    return total


def measure_model_bytes(model: torch.nn.Module, include_quant_state: bool = True) -> int:
    """Bytes of a real model's parameters and buffers, as stored (works on the meta device).

    A bitsandbytes ``Params4bit`` holds its packed uint8 data, so ``numel * element_size`` is
    already its storage size (half a byte per weight); with ``include_quant_state`` the
    per-block absmax values (and the nested double-quant state) are added too.
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(
            f"model must be a torch.nn.Module, got {type(model).__name__}; pass the model "
            "itself, not its state_dict."
        )
    total = 0
    for tensor in chain(model.parameters(), model.buffers()):
        total += tensor.numel() * tensor.element_size()
        if include_quant_state:
            total += _quant_state_bytes(tensor)
    return total


# --------------------------------------------------------------------------------------------
# The weights alone (lesson 03: what a model costs to hold in memory, not to train)
# --------------------------------------------------------------------------------------------


def param_groups(config: object) -> dict[str, int]:
    """Parameters split into ``embeddings``, ``linear`` (what QLoRA quantizes), ``other``, ``lm_head``."""
    return dict(_param_groups(config))


def weight_bytes(
    config_or_params: object,
    dtype: str = "fp32",
    quantization: str | None = None,
    double_quant: bool = True,
) -> int:
    """Bytes of a model's weights alone: all in ``dtype``, or linear layers in NF4 as QLoRA stores them.

    With ``quantization="nf4"`` the decoder's linear layers cost 4.127 bits per weight (4.5
    with ``double_quant=False``) and everything else (embeddings, norms, an untied LM head)
    stays in ``dtype``, which is what bitsandbytes does. A bare parameter count is treated as
    all-linear.
    """
    dtype = one_of(dtype, "dtype", BYTES_PER_DTYPE)
    if quantization not in (None, "nf4"):
        raise ValueError(
            f"quantization must be None or 'nf4', got {quantization!r}; use 'nf4' for QLoRA."
        )
    if not isinstance(double_quant, bool):
        raise TypeError(f"double_quant must be True or False, got {double_quant!r}.")
    if isinstance(config_or_params, bool):
        raise TypeError("config_or_params must be an int, a config or a preset name, not a bool.")
    if isinstance(config_or_params, int):
        n_params = positive_int(config_or_params, "the parameter count", "135_000_000")
        groups = {"linear": n_params, "embeddings": 0, "other": 0, "lm_head": 0}
    else:
        groups = _param_groups(config_or_params)
    n_params = sum(groups.values())
    if quantization is None:
        return n_params * BYTES_PER_DTYPE[dtype]
    bits = double_quant_bits_per_param(absmax_bits=8 if double_quant else None)
    rest = n_params - groups["linear"]
    return math.ceil(groups["linear"] * bits / 8) + rest * BYTES_PER_DTYPE[dtype]


# --------------------------------------------------------------------------------------------
# Comparing training setups (lesson 01: what fine-tuning costs and where it fits)
# --------------------------------------------------------------------------------------------

__all__ += ["fit_table", "gpus_needed", "training_state_bytes"]


def _check_estimate(value: object) -> MemoryEstimate:
    """Return ``value`` if it is a MemoryEstimate, else raise a helpful error."""
    if not isinstance(value, MemoryEstimate):
        raise TypeError(
            f"expected a MemoryEstimate, got {type(value).__name__}; make one with estimate()."
        )
    return value


def training_state_bytes(est: MemoryEstimate) -> int:
    """Bytes that exist only because the model trains: gradients plus optimizer states."""
    est = _check_estimate(est)
    return est.gradients + est.optimizer


def gpus_needed(est: MemoryEstimate, gpu: str | float, usable_fraction: float = 0.9) -> int:
    """Fewest GPUs of one kind that hold the estimate if it were split perfectly among them.

    A lower bound: it assumes every byte can be sharded (as ZeRO-3/FSDP shard weights,
    gradients and optimizer states) and ignores the communication buffers that sharding adds.
    """
    est = _check_estimate(est)
    gpu_gb = _gpu_gb(gpu)
    if isinstance(usable_fraction, bool) or not isinstance(usable_fraction, (int, float)):
        raise TypeError(f"usable_fraction must be a number in (0, 1], got {usable_fraction!r}.")
    if not 0 < usable_fraction <= 1:
        raise ValueError(f"usable_fraction must be in (0, 1], got {usable_fraction}; e.g. 0.9.")
    return max(1, math.ceil(est.total / (gpu_gb * GB * usable_fraction)))


def fit_table(
    estimates: dict[str, MemoryEstimate],
    gpus: list[str] | tuple[str, ...] | None = None,
    usable_fraction: float = 0.9,
) -> list[dict]:
    """One row per named estimate: its total in GB and, for each GPU, whether it fits."""
    if not isinstance(estimates, dict) or not estimates:
        raise TypeError(
            "estimates must be a non-empty dict {name: MemoryEstimate}; build it with estimate()."
        )
    names = list(GPUS) if gpus is None else gpus
    if isinstance(names, str) or not isinstance(names, (list, tuple)) or not names:
        raise TypeError(f"gpus must be a non-empty list of names from GPUS, got {gpus!r}.")
    for name in names:
        if name not in GPUS:
            raise ValueError(f"unknown GPU {name!r}; use names from {list(GPUS)}.")
    rows = []
    for setup, est in estimates.items():
        row: dict = {"setup": setup, "total_gb": _check_estimate(est).total / GB}
        row.update({name: fits(est, name, usable_fraction) for name in names})
        rows.append(row)
    return rows
