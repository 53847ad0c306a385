"""The course model through Unsloth: load, add LoRA, and say which backend Unsloth really used.

Lesson 10.

Lab 10 reads this module. Unsloth's ``FastLanguageModel`` picks a backend when it is imported:

- on an NVIDIA/AMD GPU, its own Triton kernels (fused RoPE, RMSNorm, cross-entropy, LoRA MLP and
  attention blocks with hand-written backward passes), bitsandbytes 4-bit, and its offloaded
  gradient checkpointing;
- with no accelerator, its **CPU fallback** (``unsloth_zoo.cpu``): stock transformers + PEFT, a
  chunked linear cross-entropy for the loss, fused AdamW, and CPU-safe trainer defaults.

A lab that runs on both must not hide which one ran: `backend` reads it from Unsloth itself and
`describe` prints it. `load_model` loads the same checkpoint `course_utils.assets` uses (the
offline copy or the hub), in the course dtype (fp32 on a CPU, bf16/fp16 on a GPU), and
`get_peft_model` puts the same LoRA on it as `train.lora_config` (r=16, α=2r, every linear layer).
Training then goes through `train.train` (TRL's ``SFTTrainer``), exactly as in lab 05.

Importing Unsloth patches transformers and TRL for the whole process, so import it (call
`import_unsloth`) before anything else trains, and compare it with plain PEFT in *separate*
processes (`course_tools.bench.training`, workload ``unsloth-lora``).
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any

import torch

from . import assets, env
from .checks import positive_int, positive_number

__all__ = [
    "LLAMA_TARGETS",
    "backend",
    "describe",
    "get_peft_model",
    "import_unsloth",
    "load_model",
]

#: The linear layers of a Llama block: the course's "all-linear" LoRA targets, named for Unsloth.
LLAMA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def import_unsloth():
    """Import Unsloth (once per process) and return the module; a clear error if it is missing."""
    if importlib.util.find_spec("unsloth") is None:
        raise ImportError(
            "Unsloth is not installed; run `make setup` (it installs unsloth and unsloth_zoo "
            "with --no-deps) or `pip install --no-deps unsloth unsloth_zoo`."
        )
    import unsloth  # lazy: Unsloth patches transformers when imported; only lab 10 asks for it

    return unsloth


def load_model(
    location: str | os.PathLike | None = None,
    *,
    dtype: torch.dtype | None = None,
    max_seq_length: int = 512,
    load_in_4bit: bool = False,
):
    """Return (model, tokenizer) from Unsloth's ``FastLanguageModel.from_pretrained``.

    `location` defaults to where `course_utils.assets` loads the course model from (the offline
    copy, or the hub when it is cached or online); `dtype` defaults to the course dtype of the
    device `env.pick_device` picks (fp32 on a CPU: Unsloth's own CPU default would be bf16).
    """
    max_seq_length = positive_int(max_seq_length, "max_seq_length", "max_seq_length=512")
    if not isinstance(load_in_4bit, bool):
        raise ValueError(f"load_in_4bit must be True or False (got {load_in_4bit!r}).")
    if location is None:
        location, _, _ = assets.resolve_source()
    elif not Path(location).is_dir():
        raise FileNotFoundError(
            f"{location} is not a model folder; leave location=None to load the course model."
        )
    if dtype is None:
        dtype = env.default_dtype(env.pick_device())
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(
            f"dtype must be a floating torch dtype such as torch.float32 (got {dtype!r})."
        )
    unsloth = import_unsloth()
    model, tokenizer = unsloth.FastLanguageModel.from_pretrained(
        str(location),
        max_seq_length=max_seq_length,
        dtype=dtype,
        load_in_4bit=load_in_4bit,
        use_gradient_checkpointing=False,
    )
    assets.align_special_tokens(tokenizer, model.generation_config)
    return model, tokenizer


def get_peft_model(
    model,
    r: int = 16,
    alpha: float | None = None,
    target_modules: tuple[str, ...] | list[str] = LLAMA_TARGETS,
    gradient_checkpointing: bool = False,
    seed: int = 0,
):
    """Put LoRA on an Unsloth model with ``FastLanguageModel.get_peft_model`` (α defaults to 2·r)."""
    r = positive_int(r, "r (the LoRA rank)", "r=16")
    alpha = 2 * r if alpha is None else positive_number(alpha, "alpha", "alpha=2*r")
    if isinstance(target_modules, str) or not target_modules:
        raise ValueError(
            "target_modules must be a list of layer names such as ['q_proj', 'v_proj']."
        )
    unsloth = import_unsloth()
    return unsloth.FastLanguageModel.get_peft_model(
        model,
        r=r,
        lora_alpha=alpha,
        lora_dropout=0.0,
        target_modules=list(target_modules),
        bias="none",
        use_gradient_checkpointing=gradient_checkpointing,
        random_state=seed,
    )


def _base(model):
    """The transformers model under a PEFT wrapper (or the model itself)."""
    inner = getattr(getattr(model, "base_model", None), "model", None)
    return inner if isinstance(inner, torch.nn.Module) else model


def backend(model=None) -> dict[str, Any]:
    """What Unsloth runs on, read from Unsloth itself (and from `model` once it is loaded)."""
    unsloth = import_unsloth()
    device_type = str(getattr(unsloth, "DEVICE_TYPE", "unknown"))
    info: dict[str, Any] = {
        "unsloth": getattr(unsloth, "__version__", "?"),
        "device_type": device_type,
        "cpu_fallback": device_type == "cpu",
    }
    if model is not None:
        base = _base(model)
        weight = next(p for p in base.parameters() if p.is_floating_point())
        info.update(
            device=weight.device.type,
            dtype=str(weight.dtype).replace("torch.", ""),
            chunked_cross_entropy=bool(vars(base).get("_unsloth_cpu_chunked_ce", False)),
            gradient_checkpointing=bool(getattr(base, "is_gradient_checkpointing", False)),
        )
    return info


def describe(model=None) -> str:
    """One line saying which Unsloth backend runs (so a CPU fallback is never silent)."""
    info = backend(model)
    if info["cpu_fallback"]:
        what = (
            "its CPU fallback: stock transformers + PEFT, chunked cross-entropy, fused AdamW "
            "(no Triton kernels)"
        )
    else:
        what = (
            f"its {info['device_type']} kernels (Triton: fused RoPE, RMSNorm, cross-entropy, LoRA)"
        )
    line = f"Unsloth {info['unsloth']} on {info['device_type']}: {what}"
    if model is not None:
        line += f"; model on {info['device']} in {info['dtype']}"
        line += f", chunked CE {'on' if info['chunked_cross_entropy'] else 'off'}"
    return line + "."
