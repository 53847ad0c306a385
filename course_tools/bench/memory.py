"""Is the memory estimator right? Measure a real training step and compare.

``python -m course_tools.bench memory`` trains SmolLM2-135M for real (full fine-tuning, LoRA
and QLoRA: forward, backward and an AdamW step), each method in a *fresh* Python subprocess so
that nothing one method allocated hides in another's numbers, measures the peak memory of the
training state and prints it next to :func:`course_utils.memory.estimate`, with the error.

What "measured" means
---------------------
On a GPU the honest number is ``torch.cuda.max_memory_allocated()``: the peak of the bytes held
by live tensors, without the CUDA context or the caching allocator's spare blocks. That is what
the estimator models, and it is what this module reports on CUDA.

A CPU has no such counter, and the obvious substitute, the process's peak resident set (RSS),
measures something else:

* **malloc keeps freed memory.** glibc raises its mmap threshold as big blocks are freed, so
  freed activations stay in its heap for re-use and the RSS stays far above the bytes in use
  after a step. RSS is the CPU twin of ``max_memory_reserved``, not of ``max_memory_allocated``.
* **The weights are memory-mapped.** safetensors maps the checkpoint; its pages count in RSS
  only once touched, and stay counted while any tensor still points into the file. The NF4
  model keeps its fp32 embeddings as views of the fp32 checkpoint, so after QLoRA loading the
  whole file read for quantization is still in RSS (clean page cache, not training state).
* Shared-library code paged in by the first backward pass, thread stacks and oneDNN buffers.

So on CPU the bench counts what PyTorch's allocator hands out: ``torch.profiler`` with
``profile_memory=True`` records every allocation and free of the CPU allocator, in order, with
its size. Their running sum is the bytes held by live tensors at every instant; its maximum
over the training steps, plus the bytes of the model's parameters and buffers when the profiler
started (:func:`course_utils.memory.measure_model_bytes`, which counts the NF4 quantization
state too), is the CPU counterpart of ``max_memory_allocated``. As an independent check, the
subprocess runs with ``MALLOC_MMAP_THRESHOLD_=65536`` (big blocks go back to the kernel as soon
as they are freed) and reports its peak RSS growth since just before the model was loaded
(``VmHWM``, reset after loading through ``/proc/self/clear_refs``): it must lie a little above
the allocator's count, never below. It is printed, not compared.

Two steps are run and the peak is taken over both: AdamW creates its two moments lazily in the
first ``step()``, so only from the second step on do weights, optimizer states, activations and
gradients live together as they do for the rest of a training run. The loop is what
``transformers.Trainer`` does: ``loss = model(**batch).loss`` (the logits are not kept),
``loss.backward()``, ``optimizer.step()``, ``optimizer.zero_grad(set_to_none=True)``. LoRA is
PEFT's: r=16, alpha=32, every linear layer of every block, adapters in fp32; QLoRA adds the
NF4 model and ``peft.prepare_model_for_kbit_training``, which turns gradient checkpointing on.
The table splits each measurement the way the estimator does: weights (parameters and buffers
as stored), gradients (``.grad`` bytes after the last backward), optimizer (AdamW's state
tensors) and activations (what the last forward pass left alive for the backward pass); below
it, the phase in which each peak fell and what it was made of.
"""

from __future__ import annotations

import argparse
import gc
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

from course_utils import env
from course_utils.assets import load_model
from course_utils.checks import fraction, one_of, positive_int
from course_utils.memory import LLAMA_LINEAR_LAYERS, METHODS, estimate, measure_model_bytes
from course_utils.peak_memory import PeakMemory, proc_status

from .common import CONFIG_KEYS, DTYPES, MB, MODELS, TINY_CONFIG, emit, run_child, tiny_model

__all__ = [
    "compare_memory",
    "format_memory_table",
    "main",
    "measure_training_step",
]


# --------------------------------------------------------------------------------------------
# One training step, inside the subprocess
# --------------------------------------------------------------------------------------------


def _prepare_model(args: argparse.Namespace, device: torch.device):
    """Load the model for ``args.method`` and wrap it for training (PEFT LoRA for lora/qlora)."""
    dtype = DTYPES[args.dtype]
    quantize = args.method == "qlora"
    if args.model == "tiny":
        model = tiny_model(dtype, device, quantize)
    else:
        model = load_model(
            device=device, dtype=dtype, quantization="nf4" if quantize else None, verbose=False
        )
    if args.method in ("lora", "qlora"):
        if quantize:  # the QLoRA recipe: norms in fp32, inputs require grad, checkpointing
            model = prepare_model_for_kbit_training(
                model, use_gradient_checkpointing=args.gradient_checkpointing
            )
        elif args.gradient_checkpointing:
            model.gradient_checkpointing_enable()
        config = LoraConfig(
            r=args.lora_r,
            lora_alpha=args.lora_alpha,
            lora_dropout=args.lora_dropout,
            target_modules=list(LLAMA_LINEAR_LAYERS),
            task_type="CAUSAL_LM",
        )
        model = get_peft_model(model, config)
    elif args.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    model.train()
    return model


def _run_step(args: argparse.Namespace) -> dict:
    """Load a model, run ``args.steps`` training steps under PeakMemory and return the numbers."""
    started = time.perf_counter()
    if args.gradient_checkpointing is None:  # the QLoRA recipe turns it on
        args.gradient_checkpointing = args.method == "qlora"
    device = env.pick_device(args.device)
    env.seed_everything(0)
    # touch the kernels, thread pool and optimizer code once on a toy, so their one-off buffers
    # are part of the baseline and not of the model's bill
    toy = torch.nn.Linear(64, 64, device=device)
    toy_opt = torch.optim.AdamW(toy.parameters())
    toy(torch.randn(8, 64, device=device)).sum().backward()
    toy_opt.step()
    del toy, toy_opt
    gc.collect()
    rss_before_load = proc_status("VmRSS")

    model = _prepare_model(args, device)
    gc.collect()
    config = model.config.to_dict() if hasattr(model, "config") else {}
    weights = measure_model_bytes(model)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5)
    vocab = config.get("vocab_size") or TINY_CONFIG["vocab_size"]
    ids = torch.randint(0, vocab, (args.batch, args.seq_len), device=device)
    gradients = 0
    step_seconds = []
    with PeakMemory(device) as peak:
        for step in range(1, args.steps + 1):
            step_started = time.perf_counter()
            with peak.phase(f"step {step} forward"):
                loss = model(input_ids=ids, labels=ids).loss
            with peak.phase(f"step {step} backward"):
                loss.backward()
            del loss
            gradients = sum(p.grad.numel() * p.grad.element_size() for p in params)
            with peak.phase(f"step {step} optimizer"):
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            step_seconds.append(time.perf_counter() - step_started)

    state_bytes = sum(
        value.numel() * value.element_size()
        for state in optimizer.state.values()
        for value in state.values()
        if isinstance(value, torch.Tensor)
    )
    last_forward = peak.phases[f"step {args.steps} forward"]
    peak_phase = max(peak.phases, key=lambda name: peak.phases[name]["peak"])
    rss = None
    if device.type == "cpu" and peak.rss_peak is not None and rss_before_load is not None:
        rss = peak.rss_peak - rss_before_load
    elif device.type == "cuda":
        rss = peak.rss_peak
    return {
        "method": args.method,
        "model": args.model,
        "device": device.type,
        "dtype": args.dtype,
        "batch": args.batch,
        "seq_len": args.seq_len,
        "steps": args.steps,
        "lora_r": args.lora_r,
        "lora_dropout": args.lora_dropout,
        "gradient_checkpointing": args.gradient_checkpointing,
        "config": {key: config.get(key) for key in CONFIG_KEYS},
        "n_params": sum(p.numel() for p in model.parameters()),
        "trainable_params": sum(p.numel() for p in params),
        "weights": weights,
        "gradients": gradients,
        "optimizer": state_bytes,
        "activations": last_forward["end"] - last_forward["start"],
        "peak": weights + max(peak.peak, 0),
        "peak_phase": peak_phase,
        # live bytes above the model's own at the start, end and peak of each phase
        "phases": peak.phases,
        "rss": rss,
        "step_seconds": step_seconds,
        "seconds": time.perf_counter() - started,
    }


# --------------------------------------------------------------------------------------------
# The parent side: subprocesses, the comparison, the table
# --------------------------------------------------------------------------------------------


@dataclass
class _StepOptions:
    """The knobs of one measured training step (validated once, turned into CLI arguments)."""

    method: str
    model: str = "smollm2"
    batch: int = 4
    seq_len: int = 128
    steps: int = 2
    dtype: str = "fp32"
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.0
    gradient_checkpointing: bool | None = None
    device: str | None = None

    def __post_init__(self) -> None:
        """Validate every field, and fill in the QLoRA default for gradient checkpointing."""
        one_of(self.method, "method", METHODS)
        one_of(self.model, "model", MODELS)
        for name in ("batch", "seq_len", "steps", "lora_r", "lora_alpha"):
            positive_int(getattr(self, name), name, f"{name}=4")
        one_of(self.dtype, "dtype", DTYPES)
        fraction(self.lora_dropout, "lora_dropout", "lora_dropout=0.0")
        if self.gradient_checkpointing is None:  # what prepare_model_for_kbit_training does
            self.gradient_checkpointing = self.method == "qlora"

    def argv(self) -> list[str]:
        """The command line of the ``_step`` subcommand for these options."""
        argv = [
            self.method,
            f"--model={self.model}",
            f"--batch={self.batch}",
            f"--seq-len={self.seq_len}",
            f"--steps={self.steps}",
            f"--dtype={self.dtype}",
            f"--lora-r={self.lora_r}",
            f"--lora-alpha={self.lora_alpha}",
            f"--lora-dropout={self.lora_dropout}",
            "--gradient-checkpointing" if self.gradient_checkpointing else "--no-checkpointing",
        ]
        if self.device is not None:
            argv.append(f"--device={self.device}")
        return argv


def measure_training_step(
    method: str,
    *,
    model: str = "smollm2",
    batch: int = 4,
    seq_len: int = 128,
    steps: int = 2,
    dtype: str = "fp32",
    lora_r: int = 16,
    lora_alpha: int = 32,
    lora_dropout: float = 0.0,
    gradient_checkpointing: bool | None = None,
    device: str | None = None,
    timeout: float = 600,
) -> dict:
    """Run ``steps`` real training steps of ``method`` in a fresh subprocess; return its numbers.

    The dict holds the measured ``peak`` (bytes), its split into ``weights``, ``gradients``,
    ``optimizer`` and ``activations``, the peak RSS growth ``rss``, the model's ``config`` and
    timings. ``gradient_checkpointing=None`` means: on for QLoRA (as
    ``prepare_model_for_kbit_training`` does), off otherwise.
    """
    options = _StepOptions(
        method=method,
        model=model,
        batch=batch,
        seq_len=seq_len,
        steps=steps,
        dtype=dtype,
        lora_r=lora_r,
        lora_alpha=lora_alpha,
        lora_dropout=lora_dropout,
        gradient_checkpointing=gradient_checkpointing,
        device=device,
    )
    return run_child(
        ["_step", *options.argv()], timeout=timeout, what=f"the {method} training step"
    )


def _estimate_for(measured: dict) -> dict:
    """The estimator's numbers for the setup a measurement ran with."""
    config = {k: v for k, v in measured["config"].items() if v is not None}
    est = estimate(
        config,
        method=measured["method"],
        dtype=measured["dtype"],
        batch=measured["batch"],
        seq_len=measured["seq_len"],
        optimizer="adamw",
        lora_r=measured["lora_r"],
        gradient_checkpointing=measured["gradient_checkpointing"],
        loss="standard",  # the measured step is `model(**batch).loss`: transformers' own loss
    )
    return est.breakdown()


def compare_memory(
    methods: Sequence[str] = METHODS,
    *,
    batch: int | None = None,
    seq_len: int | None = None,
    progress: bool = True,
    **step_options,
) -> list[dict]:
    """Measure each method in its own subprocess and pair it with the estimator's numbers.

    ``batch`` and ``seq_len`` default to 4 x 128 tokens (2 x 64 under COURSE_PROFILE=ci).
    Each row has ``method``, ``estimated`` (bytes per part and total), ``measured`` (the dict
    of :func:`measure_training_step`) and ``error`` (estimated total / measured peak - 1).
    """
    if isinstance(methods, str) or not isinstance(methods, Sequence) or not methods:
        raise TypeError(f"methods must be a list such as {list(METHODS)}, got {methods!r}.")
    for method in methods:
        one_of(method, "method", METHODS)
    batch = env.by_profile(full=4, ci=2) if batch is None else batch
    seq_len = env.by_profile(full=128, ci=64) if seq_len is None else seq_len
    rows = []
    for method in methods:
        if progress:
            print(f"[bench] {method}: {batch} x {seq_len} tokens in a fresh subprocess ...")
        measured = measure_training_step(method, batch=batch, seq_len=seq_len, **step_options)
        estimated = _estimate_for(measured)
        rows.append(
            {
                "method": method,
                "estimated": estimated,
                "measured": measured,
                "error": estimated["total"] / measured["peak"] - 1,
            }
        )
        if progress:
            print(
                f"[bench] {method}: {measured['peak'] / MB:.0f} MB measured, "
                f"{estimated['total'] / MB:.0f} MB estimated ({measured['seconds']:.0f} s)"
            )
    return rows


def _peak_story(measured: dict) -> str:
    """One line saying in which phase the peak fell and what it was made of, in MB."""
    name = measured["peak_phase"]
    phase = measured["phases"][name]
    return (
        f"{measured['method']}: peak in {name} = {measured['weights'] / MB:.1f} weights + "
        f"{phase['start'] / MB:.1f} live when it began + "
        f"{(phase['peak'] - phase['start']) / MB:.1f} added inside it"
    )


def format_memory_table(rows: Sequence[dict], tolerance: float = 0.10) -> str:
    """The comparison as a text table in MB (MiB): estimated and measured, part by part.

    A row whose total is off by more than ``tolerance`` (a fraction) is flagged with ``!``.
    """
    if isinstance(rows, (str, dict)) or not isinstance(rows, Sequence) or not rows:
        raise TypeError("rows must be the non-empty list that compare_memory() returns.")
    if isinstance(tolerance, bool) or not isinstance(tolerance, (int, float)) or tolerance <= 0:
        raise ValueError(f"tolerance must be a positive fraction such as 0.1, got {tolerance!r}.")
    parts = ("weights", "gradients", "optimizer", "activations")
    header = (
        f"{'method':<8}{'':<10}"
        + "".join(f"{name:>12}" for name in parts)
        + f"{'total':>10}{'RSS':>10}{'error':>10}"
    )
    lines = [header, "-" * len(header)]
    stories = []
    for row in rows:
        try:
            est, meas, error = row["estimated"], row["measured"], row["error"]
            method = row["method"]
            measured_parts = [meas[name] / MB for name in parts]
        except (KeyError, TypeError) as missing:
            raise TypeError(
                f"each row needs 'method', 'estimated', 'measured' and 'error' ({missing}); "
                "pass what compare_memory() returns."
            ) from None
        lines.append(
            f"{method:<8}{'estimated':<10}"
            + "".join(f"{est[name] / MB:>12.1f}" for name in parts)
            + f"{est['total'] / MB:>10.1f}"
        )
        rss = "" if meas.get("rss") is None else f"{meas['rss'] / MB:.1f}"
        flag = " " if abs(error) <= tolerance else "!"
        lines.append(
            f"{'':<8}{'measured':<10}"
            + "".join(f"{value:>12.1f}" for value in measured_parts)
            + f"{meas['peak'] / MB:>10.1f}{rss:>10}{100 * error:>+8.1f}%{flag}"
        )
        if meas.get("phases") and meas.get("peak_phase") in meas["phases"]:
            stories.append("  " + _peak_story(meas))
    lines += [
        "",
        "measured total: peak bytes of live tensors (model + the most allocated at any instant);",
        "measured activations: what the last forward pass left alive for the backward pass;",
        (
            "RSS: the GPU allocator's peak reserved bytes (not compared);"
            if any(row["measured"].get("device") == "cuda" for row in rows)
            else "RSS: growth of the process's peak resident memory since before loading "
            "(not compared);"
        ),
        f"error: estimated total / measured total - 1 ('!' = beyond +-{100 * tolerance:.0f} %).",
        "Where each peak fell (MB):",
        *stories,
    ]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------


def _step_parser() -> argparse.ArgumentParser:
    """Arguments of the internal ``_step`` subcommand (one measured run, JSON on stdout)."""
    parser = argparse.ArgumentParser(prog="python -m course_tools.bench _step")
    parser.add_argument("method", choices=METHODS)
    parser.add_argument("--model", choices=MODELS, default="smollm2")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    parser.add_argument("--lora-r", type=int, default=16)
    parser.add_argument("--lora-alpha", type=int, default=32)
    parser.add_argument("--lora-dropout", type=float, default=0.0)
    parser.add_argument("--gradient-checkpointing", action="store_true", default=None)
    parser.add_argument("--no-checkpointing", dest="gradient_checkpointing", action="store_false")
    parser.add_argument("--device", default=None)
    return parser


def step_main(argv: list[str]) -> int:
    """``_step``: one measured training step in this (fresh) process, its result printed."""
    emit(_run_step(_step_parser().parse_args(argv)))
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m course_tools.bench memory``: the estimator against measured training steps."""
    parser = argparse.ArgumentParser(
        prog="python -m course_tools.bench memory", description=main.__doc__
    )
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--batch", type=int, default=None, help="default 4 (ci profile: 2)")
    parser.add_argument("--seq-len", type=int, default=None, help="default 128 (ci profile: 64)")
    parser.add_argument("--lora-dropout", type=float, default=0.0)
    parser.add_argument("--json", type=Path, default=None, help="also write the rows here")
    parser.add_argument("--tolerance", type=float, default=0.10, help="flag errors beyond this")
    parser.add_argument(
        "--check", action="store_true", help="exit with status 1 if an error is beyond tolerance"
    )
    args = parser.parse_args(argv)
    started = time.perf_counter()
    rows = compare_memory(
        args.methods, batch=args.batch, seq_len=args.seq_len, lora_dropout=args.lora_dropout
    )
    first = rows[0]["measured"]
    print()
    print(
        f"SmolLM2-135M, one training step after a warm-up step, {first['device']}, "
        f"{first['dtype']}, batch {first['batch']} x {first['seq_len']} tokens, AdamW, "
        f"LoRA r={first['lora_r']} (dropout {first['lora_dropout']}) on all linear layers, "
        "QLoRA with gradient checkpointing"
    )
    print(format_memory_table(rows, args.tolerance))
    print(f"total time {time.perf_counter() - started:.0f} s")
    if args.json is not None:
        args.json.write_text(json.dumps(rows, indent=1))
    if args.check and any(abs(row["error"]) > args.tolerance for row in rows):
        return 1
    return 0
