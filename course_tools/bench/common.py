"""What every bench shares: the models it can run, the tiny test model, and the fresh subprocess.

Each measurement runs in a *fresh* Python process (``python -m course_tools.bench _step`` or
``_workload``), so nothing one method allocated hides in another's numbers; the child prints one
``BENCH_RESULT {json}`` line that :func:`run_child` reads back.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from course_utils import env
from course_utils.assets import TINY_LLAMA, nf4_config, tiny_llama
from course_utils.checks import positive_number

#: ``smollm2``: the course model (via course_utils.assets); ``tiny``: a random 2-layer Llama
#: built on the spot, for fast tests of the machinery.
MODELS = ("smollm2", "tiny")


#: The tiny random Llama used by the tests (no download, a few MB): assets' tiny Llama, wider.
TINY_CONFIG = {**TINY_LLAMA, "vocab_size": 1024, "hidden_size": 128, "intermediate_size": 256}


#: Config keys handed back from the subprocess so the estimator sees the real model's shape.
CONFIG_KEYS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "tie_word_embeddings",
    "attention_bias",
    "mlp_bias",
)


#: The dtypes a measured step can train in.
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


#: How a child marks its one result line.
RESULT_MARK = "BENCH_RESULT "


MB = 2**20  # bytes in a mebibyte


def tiny_model(
    dtype: torch.dtype, device: torch.device, quantize: bool, vocab_size: int | None = None
):
    """A random 2-layer Llama, saved and loaded back like a real checkpoint (NF4 if asked)."""
    config = dict(TINY_CONFIG, vocab_size=vocab_size or TINY_CONFIG["vocab_size"])
    with tempfile.TemporaryDirectory() as folder:
        tiny_llama(**config).save_pretrained(folder)
        options: dict = {"dtype": dtype}
        if quantize:
            options["quantization_config"] = nf4_config(dtype)
            options["device_map"] = {"": str(device)}
        model = AutoModelForCausalLM.from_pretrained(folder, **options)
        # unquantized weights may be memory-mapped from the folder about to go: own them
        for param in model.parameters():
            if type(param).__name__ != "Params4bit":
                param.data = param.data.clone()
    return model if quantize else model.to(device)


def run_child(argv: list[str], *, timeout: float, what: str, fixed_mmap: bool = True) -> dict:
    """Run ``python -m course_tools.bench ARGV`` in a fresh subprocess; return its result dict.

    The child prints one ``BENCH_RESULT {json}`` line; a failure or a timeout raises with the
    command to run by hand and the last lines it printed. ``fixed_mmap`` sets glibc's mmap
    threshold (for the memory bench's RSS column; it slows training down).
    """
    positive_number(timeout, "timeout", "timeout=900 (seconds)")
    command = [sys.executable, "-m", "course_tools.bench", *argv]
    child_env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    # glibc keeps freed blocks below its (self-raising) mmap threshold for re-use, so RSS would
    # stay up after activations are freed; a fixed threshold hands big blocks back at once and
    # makes the RSS column an independent upper bound of the allocator's count
    if fixed_mmap:
        child_env.setdefault("MALLOC_MMAP_THRESHOLD_", "65536")
    else:
        child_env.pop("MALLOC_MMAP_THRESHOLD_", None)
    root = str(Path(__file__).resolve().parents[2])  # importable without being installed
    child_env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))
    shown = "python " + " ".join(command[1:])
    try:
        done = subprocess.run(
            command, capture_output=True, text=True, timeout=timeout, env=child_env, check=False
        )
    except subprocess.TimeoutExpired:
        raise RuntimeError(
            f"{what} took more than {timeout:g} s; pass a smaller batch or seq_len, or a "
            f"larger timeout (the command was `{shown}`)."
        ) from None
    lines = [line for line in done.stdout.splitlines() if line.startswith(RESULT_MARK)]
    if done.returncode != 0 or not lines:
        tail = "\n".join((done.stderr or done.stdout).strip().splitlines()[-15:])
        raise RuntimeError(
            f"{what} failed (exit code {done.returncode}); run `{shown}` by hand to see why. "
            f"Last lines:\n{tail}"
        )
    return json.loads(lines[-1][len(RESULT_MARK) :])


def machine() -> dict[str, object]:
    """What the bench ran on: CPU model, cores, threads, RAM, device and library versions."""
    report = env.environment_report()
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as handle:
            names = [line.split(":", 1)[1].strip() for line in handle if "model name" in line]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    keep = ("platform", "cpu cores", "torch threads", "RAM (GB)", "device", "dtype", "gpu")
    versions = ("torch", "transformers", "peft", "trl", "bitsandbytes")
    return {
        "cpu": cpu,
        **{k: report[k] for k in keep if k in report},
        **{k: report[k] for k in versions if k in report},
    }


def emit(result: dict) -> None:
    """Print a child's result as the one line `run_child` reads back."""
    print(RESULT_MARK + json.dumps(result), flush=True)
