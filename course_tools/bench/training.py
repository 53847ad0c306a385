"""Full fine-tuning, LoRA and QLoRA measured side by side: speed, MFU and peak memory.

``python -m course_tools.bench train`` (the first half of ``make bench``) trains SmolLM2-135M
for a few steps with each method, every workload in a *fresh* subprocess, on the same data: the
Python language reference (``course_utils.data``) cut into blocks of ``seq_len`` tokens, so every
step sees exactly ``batch x seq_len`` real tokens and no padding. The workloads:

* ``course-full``, ``course-lora``, ``course-qlora``: ``train.prepare_model`` + ``train.train``
  (TRL's ``SFTTrainer``) with the course's own kernels, the fused loss and SwiGLU (lab 10's
  "going further"), LoRA r=16 on every linear layer, QLoRA on the NF4 model with gradient
  checkpointing;
* ``sft-lora``: the same LoRA with TRL's stock loss and the model's own MLP: the labs' path
  (lab 05 writes it out with ``SFTConfig`` and ``SFTTrainer``);
* ``trainer-lora``: the same LoRA workload through plain ``transformers.Trainer`` + PEFT, the
  reference the course path must not be slower than;
* ``unsloth-lora``: the same LoRA through Unsloth (``FastLanguageModel``, lab 10) and
  ``train.train`` with the plain loss Unsloth replaces by its chunked one; on a CPU that is
  Unsloth's CPU fallback, on a GPU its Triton kernels.

What each number means
----------------------
* **time per step**: the median wall time of the steps after the third (step 1 warms up the
  kernels and the optimizer; steps 2 and 3 run under the memory profiler, which slows them).
* **tokens/s**: tokens per step / time per step.
* **MFU** (model FLOPs utilisation): model FLOPs per second / the fp32 matmul rate this machine
  reached *while that workload ran*: `matmul_rate` on a model-shaped product, sampled in the
  workload's own process after each step (outside the step's timing), the best sample of the
  timed steps. A shared machine speeds up and slows down by 20 % and more within minutes; a rate
  measured once, before every workload, would credit or blame a workload for the spell it ran in.
  Model FLOPs per token: ``6·N`` for full fine-tuning (forward 2N, backward 4N: input and weight
  gradients); ``4·N + 6·N_lora`` for LoRA and QLoRA (the frozen weights need input gradients but
  no weight gradients; the adapters need both). N counts every parameter once (SmolLM2 ties its
  embedding to the output layer, whose matmul is the FLOPs), and the output layer counts only on
  the tokens with a label (on chat data the prompt's logits are not needed, and the fused loss
  does not compute them); attention scores, norms, the recomputation of gradient checkpointing
  and NF4 dequantization are not counted.
* **peak memory**: bytes of live tensors during steps 2-3 (`train.train(measure_memory=True)`,
  via `bench.PeakMemory`), next to `memory.estimate` for the same batch, loss and MLP (the
  course's fused loss, `course_utils.fused_loss`, and Unsloth's CPU cross-entropy hold the
  logits one chunk of tokens at a time, `memory.LOSSES`; the course's `course_utils.swiglu`
  keeps two MLP tensors per layer instead of four, `memory.MLPS`); the error is
  estimated / measured - 1.

`run` writes ``train.md``, ``train.csv`` and ``train.png`` to the output folder
(``bench/results/`` by default) and returns the rows.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import matplotlib.pyplot as plt
import torch
from datasets import Dataset
from peft import LoraConfig, get_peft_model
from transformers import Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_callback import PrinterCallback

from course_tools import train
from course_utils import assets, data, env, unsloth_backend
from course_utils.assets import load_model
from course_utils.checks import one_of, positive_int
from course_utils.data import IGNORE_INDEX
from course_utils.memory import LLAMA_LINEAR_LAYERS, METHODS, estimate

from .common import CONFIG_KEYS, MODELS, emit, machine, run_child, tiny_model

__all__ = [
    "DATA",
    "TARGETS",
    "WORKLOADS",
    "flops_per_token",
    "format_table",
    "matmul_rate",
    "measure_workload",
    "run",
    "run_workload",
    "summarise",
]

#: The workloads: the course path for each method, LoRA through plain Trainer + PEFT, and
#: LoRA through Unsloth.
WORKLOADS = (
    "course-full",
    "course-lora",
    "course-qlora",
    "sft-lora",
    "trainer-lora",
    "unsloth-lora",
)
#: What each path trains with inside `train.train`: (TRL loss_type, the course's SwiGLU). course:
#: the course's fused loss and SwiGLU (lab 10's "going further"); sft: TRL's stock SFTTrainer,
#: lab 05's path; unsloth: the plain loss, which Unsloth's CPU fallback replaces by its own.
KERNELS = {"course": ("fused", True), "sft": ("chunked_nll", False), "unsloth": ("nll", False)}
#: The data every workload trains on: ``blocks`` of the Python reference (every token labelled,
#: no padding) or ``chat``, the labs' rentals examples (assistant-only labels, padded per batch).
DATA = ("blocks", "chat")
#: What the issue asks of this CPU: speed ratio, MFU and memory ratios (see `summarise`).
TARGETS = {
    "course / trainer speed": (">=", 1.0),
    "MFU lora": (">=", 0.60),
    "MFU full": (">=", 0.80),
    "peak qlora / lora": ("<=", 0.6),
    "peak lora / full": ("<=", 0.6),
    "estimator error": ("|x|<=", 0.10),
}
MB = 2**20
_TIMED_AFTER = 3  # step 1 warms up; steps 2-3 run under the memory profiler
_SAMPLE_SHAPE = (1024, 576, 1536)  # the MLP's up-projection of 8 x 128 tokens (m, k, n)


# --------------------------------------------------------------------------------------------
# Arguments
# --------------------------------------------------------------------------------------------


def _check_workloads(workloads: object) -> list[str]:
    """Return `workloads` as a list if every one is in WORKLOADS, else raise."""
    if isinstance(workloads, str) or not isinstance(workloads, Sequence) or not workloads:
        raise ValueError(f"workloads must be a non-empty list drawn from {list(WORKLOADS)}.")
    unknown = [w for w in workloads if w not in WORKLOADS]
    if unknown:
        raise ValueError(f"unknown workload(s) {unknown}; choose from {list(WORKLOADS)}.")
    return list(workloads)


def _check_sizes(**sizes: object) -> None:
    """Raise unless every size is a positive int (steps must also leave a step to time)."""
    for name, value in sizes.items():
        positive_int(value, name, f"{name}=4")
    if sizes.get("steps", 2) < 2:
        raise ValueError("steps must be at least 2 (the first step only warms up); e.g. steps=6.")


# --------------------------------------------------------------------------------------------
# Inside the subprocess: one workload
# --------------------------------------------------------------------------------------------


def blocks(tokenizer, n_blocks: int, seq_len: int):
    """A Dataset of `n_blocks` blocks of `seq_len` tokens of the Python reference (labels = ids)."""

    ids: list[list[int]] = []
    have = 0
    for text in data.load_python_reference("train"):
        ids.append(tokenizer(text)["input_ids"])
        have += len(ids[-1]) + 1
        if have >= n_blocks * seq_len:
            break
    blocks = data.group_texts(ids, seq_len, tokenizer.eos_token_id)
    if len(blocks["input_ids"]) < n_blocks:
        raise ValueError(f"the reference text holds fewer than {n_blocks} blocks of {seq_len}.")
    return Dataset.from_dict({key: rows[:n_blocks] for key, rows in blocks.items()})


def _chat(tokenizer, n_examples: int):
    """A Dataset of the first `n_examples` rentals chat examples, assistant-only labels."""
    examples = data.load_instruction_task("train")
    if len(examples) < n_examples:
        raise ValueError(f"the rentals task has {len(examples)} examples, fewer than {n_examples}.")
    return train.chat_dataset(tokenizer, examples[:n_examples])


def load_base(model_name: str, method: str, tokenizer, device: torch.device, path: str = "course"):
    """The base model for a method: SmolLM2 from the course cache or the tiny random Llama."""
    quantize = method == "qlora"
    if path == "unsloth":
        return _load_with_unsloth(model_name, tokenizer)
    if model_name == "tiny":
        return tiny_model(torch.float32, device, quantize, vocab_size=len(tokenizer))

    return load_model(device=device, quantization="nf4" if quantize else None, verbose=False)


_TINY_FOLDERS: list[tempfile.TemporaryDirectory] = []  # alive until the process ends


def _load_with_unsloth(model_name: str, tokenizer):
    """The base model loaded by Unsloth's FastLanguageModel (the tiny Llama via a saved folder)."""
    unsloth_backend.import_unsloth()  # before the model exists, as Unsloth asks
    location = None
    if model_name == "tiny":
        folder = tempfile.TemporaryDirectory()
        _TINY_FOLDERS.append(folder)
        tiny = tiny_model(torch.float32, torch.device("cpu"), False, vocab_size=len(tokenizer))
        tiny.save_pretrained(folder.name)
        tokenizer.save_pretrained(folder.name)
        location = folder.name
    model, _ = unsloth_backend.load_model(location)
    return model


def _unsloth_path(model, tokenizer, dataset, steps, batch, lora_r, lr) -> dict:
    """LoRA through Unsloth's get_peft_model and train.train with the loss Unsloth chunks."""
    model = unsloth_backend.get_peft_model(model, r=lora_r)
    out = _train_measured(model, tokenizer, dataset, "lora", steps, batch, lr, path="unsloth")
    return {**out, "backend": unsloth_backend.describe(model)}


def _step_timer(step_seconds: list[float]):
    """A TrainerCallback that appends the wall time of every optimizer step to `step_seconds`."""

    class StepTimer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            self.started = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            step_seconds.append(time.perf_counter() - self.started)

    return StepTimer()


def _rate_sampler(rates: list[float]):
    """A TrainerCallback that appends the fp32 matmul rate, measured after every step, to `rates`."""

    class RateSampler(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            # the last callback: the step timer and the memory profiler have stopped already
            rates.append(matmul_rate(shapes=(_SAMPLE_SHAPE,), repeats=3))

    return RateSampler()


def _plain_trainer_lora(
    model, tokenizer, dataset, steps: int, batch: int, lora_r: int, lr: float
) -> dict:
    """LoRA through plain transformers.Trainer + PEFT (no TRL): the reference path."""

    config = LoraConfig(
        r=lora_r,
        lora_alpha=2 * lora_r,
        lora_dropout=0.0,
        target_modules=list(LLAMA_LINEAR_LAYERS),
        bias="none",
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(model, config)
    step_seconds: list[float] = []
    rates: list[float] = []
    with tempfile.TemporaryDirectory() as scratch:
        args = TrainingArguments(
            output_dir=scratch,
            max_steps=steps,
            per_device_train_batch_size=batch,
            learning_rate=lr,
            lr_scheduler_type="linear",
            weight_decay=0.0,
            logging_steps=1,
            save_strategy="no",
            report_to="none",
            seed=0,  # train.train's seeds: the same shuffle, so the same batches in the same order
            data_seed=0,
            dataloader_pin_memory=train.on_cuda(model),
            disable_tqdm=True,
            **train.precision_flags(model),  # the same mixed precision as the course path
        )
        trainer = Trainer(
            model=model,
            args=args,
            train_dataset=dataset,
            # blocks are all one length; chat examples are padded per batch (labels with -100)
            data_collator=data.make_collator(tokenizer.pad_token_id),
            callbacks=[_step_timer(step_seconds), _rate_sampler(rates)],
        )
        trainer.remove_callback(PrinterCallback)  # the log dicts, printed (the course path too)
        trainer.train()
    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    trainable, total = train.count_parameters(model)
    return {
        "step_seconds": step_seconds,
        "losses": losses,
        "trainable_params": trainable,
        "total_params": total,
        "peak_memory": None,
        "matmul_rates": rates,
        "model": model,
    }


def _train_measured(model, tokenizer, dataset, method, steps, batch, lr, path: str) -> dict:
    """train.train (TRL SFTTrainer) on a prepared model, memory measured; the bench's fields.

    `path` picks the loss and the MLP (KERNELS): the course's kernels, TRL's stock ones, or the
    plain loss that Unsloth's CPU fallback replaces with its chunked one.
    """
    loss_type, fused_mlp = KERNELS[path]
    rates: list[float] = []
    result = train.train(
        model,
        tokenizer,
        dataset,
        method=method,
        steps=steps,
        batch_size=batch,
        learning_rate=lr,
        live_plot=False,
        measure_memory=True,
        progress_bar=False,
        loss_type=loss_type,
        fused_mlp=fused_mlp,
        callbacks=[_rate_sampler(rates)],
    )
    return {
        "step_seconds": result.step_seconds,
        "losses": result.losses,
        "trainable_params": result.trainable_params,
        "total_params": result.total_params,
        "peak_memory": result.peak_memory,
        "matmul_rates": rates,
        "model": model,
    }


def _sft_path(model, tokenizer, dataset, method, steps, batch, lora_r, lr, path) -> dict:
    """train.prepare_model + train.train (TRL SFTTrainer) with `path`'s kernels, memory measured."""
    lora = None if method == "full" else train.lora_config(r=lora_r)
    model = train.prepare_model(model, method, lora=lora)
    return _train_measured(model, tokenizer, dataset, method, steps, batch, lr, path=path)


def run_workload(
    workload: str,
    *,
    model: str = "smollm2",
    steps: int = 6,
    batch: int = 8,
    seq_len: int = 128,
    lora_r: int = 16,
    learning_rate: float = 1e-4,
    device: str | None = None,
    data: str = "blocks",
) -> dict:
    """Run one workload in this process and return its measurements (a JSON-able dict)."""
    workload = _check_workloads([workload])[0]
    data = one_of(data, "data", DATA)
    _check_sizes(steps=steps, batch=batch, seq_len=seq_len, lora_r=lora_r)

    if model not in MODELS:
        raise ValueError(f"model must be one of {MODELS}, got {model!r}.")
    started = time.perf_counter()
    path, method = workload.split("-")
    where = env.pick_device(device)
    env.seed_everything(0)
    tokenizer = assets.load_tokenizer()
    if data == "blocks":
        dataset = blocks(tokenizer, steps * batch, seq_len)
    else:
        dataset = _chat(tokenizer, steps * batch)
    # one epoch exactly, same seed: both paths see the same batches in the same order
    tokens_per_step = sum(len(ids) for ids in dataset["input_ids"]) / steps
    # the positions the loss counts: label t + 1 is predicted at t, so the first label never is
    labelled_per_step = (
        sum(sum(label != IGNORE_INDEX for label in labels[1:]) for labels in dataset["labels"])
        / steps
    )
    base = load_base(model, method, tokenizer, where, path)
    if path in ("course", "sft"):
        out = _sft_path(base, tokenizer, dataset, method, steps, batch, lora_r, learning_rate, path)
    elif path == "unsloth":
        out = _unsloth_path(base, tokenizer, dataset, steps, batch, lora_r, learning_rate)
    else:
        out = _plain_trainer_lora(base, tokenizer, dataset, steps, batch, lora_r, learning_rate)
    trained = out.pop("model")
    config = trained.config.to_dict()

    step_seconds = out["step_seconds"]
    timed = step_seconds[_TIMED_AFTER:] or step_seconds[1:]
    per_step = sorted(timed)[len(timed) // 2]
    # rates[i] follows step i + 1: the samples around the timed steps
    rates = out["matmul_rates"][_TIMED_AFTER - 1 :] or out["matmul_rates"]
    return {
        "workload": workload,
        "path": path,
        "method": method,
        "model": model,
        "device": where.type,
        "dtype": str(next(p for p in trained.parameters() if p.is_floating_point()).dtype)[6:],
        "steps": steps,
        "batch": batch,
        "data": data,
        "seq_len": seq_len if data == "blocks" else None,
        "lora_r": lora_r,
        "tokens_per_step": tokens_per_step,
        "labelled_per_step": labelled_per_step,
        "seconds_per_step": per_step,
        "tokens_per_second": tokens_per_step / per_step,
        "timed_steps": len(timed),
        "matmul_rate": max(rates),
        "config": {key: config.get(key) for key in CONFIG_KEYS},
        "seconds": time.perf_counter() - started,
        **out,
    }


def measure_workload(workload: str, *, timeout: float = 900, **options) -> dict:
    """Run one workload in a fresh subprocess (nothing shared with the others) and return it."""
    workload = _check_workloads([workload])[0]
    argv = ["_workload", workload] + [f"--{k.replace('_', '-')}={v}" for k, v in options.items()]
    # normal malloc: the memory bench's MALLOC_MMAP_THRESHOLD_ would make every step pay for
    # mmap/munmap and page zeroing, and the speed measured would not be the labs' speed
    return run_child(argv, timeout=timeout, what=f"the {workload} workload", fixed_mmap=False)


# --------------------------------------------------------------------------------------------
# The parent: matmul rate, FLOPs, the comparison
# --------------------------------------------------------------------------------------------


def matmul_rate(
    shapes: Sequence[tuple[int, int, int]] = ((2048, 2048, 2048), (1024, 576, 1536)),
    device: str | None = None,
    repeats: int = 5,
) -> float:
    """The best fp32 (fp32 on CPU, the course dtype on GPU) matmul rate in FLOP/s over `shapes`.

    Each shape (m, k, n) is an (m x k) @ (k x n) product, timed `repeats` times after a warm-up;
    the best time counts (2·m·k·n FLOPs).
    """
    _check_sizes(repeats=repeats)
    where = env.pick_device(device)
    dtype = env.default_dtype(where)
    best = 0.0
    for m, k, n in shapes:
        _check_sizes(m=m, k=k, n=n)
        a = torch.randn(m, k, device=where, dtype=dtype)
        b = torch.randn(k, n, device=where, dtype=dtype)
        a @ b  # warm-up
        for _ in range(repeats):
            if where.type == "cuda":
                torch.cuda.synchronize()
            started = time.perf_counter()
            a @ b
            if where.type == "cuda":
                torch.cuda.synchronize()
            best = max(best, 2 * m * k * n / (time.perf_counter() - started))
    return best


def flops_per_token(
    method: str,
    total_params: int,
    trainable_params: int,
    *,
    head_params: int = 0,
    labelled: float = 1.0,
) -> int:
    """Model FLOPs of one training token: 6·N (full) or 4·N + 6·N_lora (LoRA, QLoRA).

    The output layer's `head_params` count only on the `labelled` share of the tokens: the loss
    needs no logits where the label is -100 (a chat prompt), so those FLOPs are not model FLOPs.
    """
    one_of(method, "method", METHODS)
    _check_sizes(total_params=total_params, trainable_params=trainable_params)
    if isinstance(head_params, bool) or not isinstance(head_params, int) or head_params < 0:
        raise ValueError(f"head_params must be an int >= 0 (got {head_params!r}), e.g. 0.")
    if (
        isinstance(labelled, bool)
        or not isinstance(labelled, int | float)
        or not 0 <= labelled <= 1
    ):
        raise ValueError(f"labelled must be a share in [0, 1] (got {labelled!r}), e.g. 1.0.")
    per_head = 6 if method == "full" else 4  # a frozen head needs no weight gradient
    unused = round(per_head * head_params * (1 - labelled))
    if method == "full":
        return 6 * total_params - unused
    return 4 * (total_params - trainable_params) + 6 * trainable_params - unused


def _loss(row: dict) -> str:
    """The loss a workload trained with, as memory.LOSSES names it."""
    if row["path"] in ("course", "sft"):  # train.train with the path's loss
        return KERNELS[row["path"]][0]
    if row["path"] == "unsloth" and row["device"] == "cpu":  # Unsloth's CPU fallback
        return "unsloth_cpu"
    return "standard"  # plain Trainer (Unsloth's GPU kernels are not modelled)


def _estimate(row: dict) -> int:
    """The memory estimator's total for the setup a workload ran with, its loss included."""
    config = {k: v for k, v in row["config"].items() if v is not None}
    dtype = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}.get(row["dtype"], "fp32")
    return estimate(
        config,
        method=row["method"],
        dtype=dtype,
        batch=row["batch"],
        seq_len=row["seq_len"],
        optimizer="adamw",
        lora_r=row["lora_r"],
        gradient_checkpointing=row["method"] == "qlora",
        loss=_loss(row),
        mlp="swiglu" if row["path"] == "course" else "standard",
    ).total


def _with_derived(row: dict, rate: float) -> dict:
    """Add MFU (over the workload's own matmul rate) and the estimator's number to one row.

    `rate` is the parent's rate, measured before the workloads; it stands in only for a row
    that sampled none.
    """
    config = row["config"]
    per_token = flops_per_token(
        row["method"],
        row["total_params"],
        row["trainable_params"],
        head_params=config["vocab_size"] * config["hidden_size"],
        labelled=row["labelled_per_step"] / row["tokens_per_step"],
    )
    row = {**row, "flops_per_token": per_token, "parent_matmul_rate": rate}
    row["matmul_rate"] = row.get("matmul_rate") or rate
    row["mfu"] = per_token * row["tokens_per_second"] / row["matmul_rate"]
    if row["peak_memory"] and row["seq_len"]:  # chat batches vary in length: not estimated
        row["estimated_memory"] = _estimate(row)
        row["estimator_error"] = row["estimated_memory"] / row["peak_memory"] - 1
    else:
        row["estimated_memory"] = row["estimator_error"] = None
    return row


def summarise(rows: Sequence[dict]) -> dict[str, float | None]:
    """The target quantities (TARGETS' keys) from measured rows; None where a workload is missing."""
    by = {row["workload"]: row for row in rows}

    def get(workload, key):
        return by[workload][key] if workload in by and by[workload].get(key) else None

    def ratio(a, b):
        return a / b if a is not None and b is not None else None

    errors = [row["estimator_error"] for row in rows if row.get("estimator_error") is not None]
    return {
        "course / trainer speed": ratio(
            get("course-lora", "tokens_per_second"), get("trainer-lora", "tokens_per_second")
        ),
        "MFU lora": get("course-lora", "mfu"),
        "MFU full": get("course-full", "mfu"),
        "peak qlora / lora": ratio(
            get("course-qlora", "peak_memory"), get("course-lora", "peak_memory")
        ),
        "peak lora / full": ratio(
            get("course-lora", "peak_memory"), get("course-full", "peak_memory")
        ),
        "estimator error": max(errors, key=abs) if errors else None,
    }


def _met(name: str, value: float | None) -> str:
    """'met' / 'NOT met' / 'not measured' for one target."""
    if value is None:
        return "not measured"
    op, bound = TARGETS[name]
    ok = {">=": value >= bound, "<=": value <= bound, "|x|<=": abs(value) <= bound}[op]
    return "met" if ok else "NOT met"


# --------------------------------------------------------------------------------------------
# Reports: markdown, CSV, PNG
# --------------------------------------------------------------------------------------------

_COLUMNS = (
    ("workload", "workload", "{}"),
    ("trainable_params", "trainable params", "{:,}"),
    ("seconds_per_step", "s/step", "{:.2f}"),
    ("tokens_per_second", "tokens/s", "{:.1f}"),
    ("flops_per_token", "GFLOP/token", None),
    ("matmul_rate", "matmul GFLOP/s", None),
    ("mfu", "MFU", "{:.1%}"),
    ("peak_memory", "peak MB", None),
    ("estimated_memory", "estimated MB", None),
    ("estimator_error", "error", "{:+.1%}"),
)


def _cell(row: dict, key: str, fmt: str | None) -> str:
    """One table cell: MB for memory, GFLOP for FLOPs, `fmt` otherwise, '-' when missing."""
    value = row.get(key)
    if value is None:
        return "-"
    if key in ("peak_memory", "estimated_memory"):
        return f"{value / MB:.0f}"
    if key == "flops_per_token":
        return f"{value / 1e9:.3f}"
    if key == "matmul_rate":
        return f"{value / 1e9:.0f}"
    return fmt.format(value)


def _fastest(rounds: Sequence[dict]) -> dict:
    """The round with the shortest time per step, with every round's time per step beside it."""
    best = dict(min(rounds, key=lambda row: row["seconds_per_step"]))
    best["round_seconds_per_step"] = [row["seconds_per_step"] for row in rounds]
    return best


def format_table(rows: Sequence[dict], info: dict | None = None) -> str:
    """The comparison as markdown: the machine, one row per workload, then the targets."""
    if isinstance(rows, (str, dict)) or not isinstance(rows, Sequence) or not rows:
        raise TypeError("rows must be the non-empty list that run() returns.")
    for row in rows:
        if not isinstance(row, dict) or "workload" not in row or "mfu" not in row:
            raise TypeError("each row must be a dict from run() (with 'workload' and 'mfu').")
    first = rows[0]
    lines = []
    if info:
        lines.append("Machine: " + ", ".join(f"{k} {v}" for k, v in info.items()) + ".")
        lines.append("")
    if first["seq_len"]:
        tokens = f"{first['seq_len']} tokens of the Python reference (no padding, all labelled)"
    else:
        tokens = (
            f"rentals chat examples (mean {first['tokens_per_step']:.0f} tokens per step, "
            "padded per batch, assistant-only labels; memory not estimated)"
        )
    lines.append(
        f"Model {first['model']}, {first['device']} {first['dtype']}, batch {first['batch']} x "
        f"{tokens}, LoRA r={first['lora_r']} alpha={2 * first['lora_r']} on all linear layers, "
        f"AdamW; median of {first['timed_steps']} timed steps of {first['steps']}"
        f"{_rounds_note(rows)}. MFU is over the fp32 matmul rate each workload reached in its own "
        f"process (a {'x'.join(map(str, _SAMPLE_SHAPE))} product after every step, the best "
        f"sample of its timed steps; the parent measured {first['parent_matmul_rate'] / 1e9:.1f}"
        " GFLOP/s before the workloads)."
    )
    lines.append("")
    lines.append("| " + " | ".join(title for _, title, _ in _COLUMNS) + " |")
    lines.append("|" + "---|" * len(_COLUMNS))
    for row in rows:
        lines.append("| " + " | ".join(_cell(row, k, f) for k, _, f in _COLUMNS) + " |")
    lines += ["", "| target | measured | goal | |", "|---|---|---|---|"]
    for name, value in summarise(rows).items():
        op, bound = TARGETS[name]
        shown = "-" if value is None else (f"{value:.1%}" if "MFU" in name else f"{value:.2f}")
        if name == "estimator error" and value is not None:
            shown = f"{value:+.1%} (largest)"
        goal = {">=": "≥ ", "<=": "≤ ", "|x|<=": "within ±"}[op]
        goal += f"{bound:.0%}" if "MFU" in name or op == "|x|<=" else f"{bound}"
        lines.append(f"| {name} | {shown} | {goal} | {_met(name, value)} |")
    by = {row["workload"]: row for row in rows}
    if "unsloth-lora" in by and "course-lora" in by:
        unsloth, course = by["unsloth-lora"], by["course-lora"]
        lines += [
            "",
            f"Unsloth / course LoRA speed: "
            f"{unsloth['tokens_per_second'] / course['tokens_per_second']:.2f} (no target: "
            f"reported as measured). {unsloth.get('backend', '')}",
        ]
    return "\n".join(lines)


def _rounds_note(rows: Sequence[dict]) -> str:
    """', the fastest of N interleaved rounds (s/step of each: ...)' when there were several."""
    times = {row["workload"]: row.get("round_seconds_per_step", []) for row in rows}
    n = max(len(t) for t in times.values())
    if n < 2:
        return ""
    each = "; ".join(f"{w} " + " / ".join(f"{t:.2f}" for t in ts) for w, ts in times.items())
    return f", the fastest of {n} interleaved rounds (s/step of each: {each})"


def _write_csv(rows: Sequence[dict], path: Path) -> None:
    """One CSV line per workload with every scalar measurement."""
    keys = [k for k in rows[0] if not isinstance(rows[0][k], (dict, list))]
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=keys, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def plot(rows: Sequence[dict]):
    """Tokens/s and MFU per workload beside measured vs estimated peak memory; the figure."""
    names = [row["workload"] for row in rows]
    figure, (speed, memory) = plt.subplots(1, 2, figsize=(10, 3.6))
    bars = speed.bar(names, [row["tokens_per_second"] for row in rows], color="tab:blue")
    for bar, row in zip(bars, rows, strict=True):
        speed.annotate(
            f"MFU {row['mfu']:.0%}",
            (bar.get_x() + bar.get_width() / 2, bar.get_height()),
            ha="center",
            va="bottom",
            fontsize=8,
        )
    speed.set_ylabel("training tokens / s")
    speed.set_title("speed (higher is better)")
    with_memory = [row for row in rows if row.get("peak_memory")]
    estimated = [r["estimated_memory"] for r in with_memory]
    x = range(len(with_memory))
    memory.bar(
        [i - 0.2 for i in x], [r["peak_memory"] / MB for r in with_memory], 0.4, label="measured"
    )
    if all(e is not None for e in estimated):  # chat batches vary in length: not estimated
        memory.bar([i + 0.2 for i in x], [e / MB for e in estimated], 0.4, label="estimated")
    memory.set_xticks(list(x), [r["workload"] for r in with_memory])
    memory.set_ylabel("peak training memory (MB)")
    memory.set_title("memory (lower is better)")
    memory.legend()
    for ax in (speed, memory):
        ax.tick_params(axis="x", labelsize=8)
        ax.grid(axis="y", alpha=0.3)
    figure.tight_layout()
    return figure


def run(
    workloads: Sequence[str] = WORKLOADS,
    *,
    out: str | os.PathLike = "bench/results",
    model: str = "smollm2",
    steps: int | None = None,
    batch: int = 8,
    seq_len: int = 128,
    lora_r: int = 16,
    data: str = "blocks",
    progress: bool = True,
    rounds: int | None = None,
) -> list[dict]:
    """Measure each workload in its own subprocess; write train.md/.csv/.png under `out`.

    ``steps`` defaults to 6 (4 under COURSE_PROFILE=ci); ``data="chat"`` trains on the labs'
    chat examples and writes ``train-chat.*``. ``rounds`` (default 2, 1 under the ci profile)
    runs the whole list that many times, interleaved, and keeps each workload's fastest round,
    so a slow spell of a shared machine does not land on one workload alone. Returns the rows
    (with MFU and the estimator's number added).
    """
    workloads = _check_workloads(workloads)
    data = one_of(data, "data", DATA)
    name = "train" if data == "blocks" else "train-chat"
    steps = env.by_profile(full=6, ci=4) if steps is None else steps
    rounds = env.by_profile(full=2, ci=1) if rounds is None else rounds
    _check_sizes(steps=steps, batch=batch, seq_len=seq_len, lora_r=lora_r, rounds=rounds)
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    rate = matmul_rate()
    if progress:
        print(f"[bench] fp32 matmul rate on this machine: {rate / 1e9:.1f} GFLOP/s")
    measured: dict[str, list[dict]] = {workload: [] for workload in workloads}
    for round_no in range(1, rounds + 1):
        for workload in workloads:
            if progress:
                print(
                    f"[bench] round {round_no}/{rounds}, {workload}: {steps} steps of {batch} "
                    f"{data} rows ...",
                    flush=True,
                )
            row = _with_derived(
                measure_workload(
                    workload,
                    model=model,
                    steps=steps,
                    batch=batch,
                    seq_len=seq_len,
                    lora_r=lora_r,
                    data=data,
                ),
                rate,
            )
            measured[workload].append(row)
            if progress:
                print(
                    f"[bench] {workload}: {row['seconds_per_step']:.2f} s/step, "
                    f"{row['tokens_per_second']:.0f} tokens/s, MFU {row['mfu']:.0%} "
                    f"({row['seconds']:.0f} s)",
                    flush=True,
                )
    rows = [_fastest(measured[workload]) for workload in workloads]
    info = machine()
    table = format_table(rows, info)
    (folder / f"{name}.md").write_text(
        "# make bench: training speed and memory\n\n" + table + "\n", encoding="utf-8"
    )
    _write_csv(rows, folder / f"{name}.csv")
    (folder / f"{name}.json").write_text(json.dumps({"machine": info, "rows": rows}, indent=1))

    figure = plot(rows)
    figure.savefig(folder / f"{name}.png", dpi=110)
    plt.close(figure)
    if progress:
        print()
        print(table)
        print(
            f"\nwrote {folder}/{name}.md, .csv, .json, .png ({time.perf_counter() - started:.0f} s)"
        )
    return rows


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------


def workload_main(argv: list[str]) -> int:
    """``_workload``: one training workload in this (fresh) process, its result printed."""
    parser = argparse.ArgumentParser(prog="python -m course_tools.bench _workload")
    parser.add_argument("workload", choices=WORKLOADS)
    parser.add_argument("--model", choices=MODELS, default="smollm2")
    for name, default in (("steps", 6), ("batch", 8), ("seq-len", 128), ("lora-r", 16)):
        parser.add_argument(f"--{name}", type=int, default=default)
    parser.add_argument("--learning-rate", type=float, default=1e-4)
    parser.add_argument("--device", default=None)
    parser.add_argument("--data", choices=DATA, default="blocks")
    options = vars(parser.parse_args(argv))
    emit(run_workload(options.pop("workload"), **options))
    return 0


def main(argv: list[str]) -> int:
    """``python -m course_tools.bench train``: speed, MFU and memory of each method."""
    parser = argparse.ArgumentParser(
        prog="python -m course_tools.bench train", description=main.__doc__
    )
    parser.add_argument("--workloads", nargs="+", choices=WORKLOADS, default=list(WORKLOADS))
    parser.add_argument("--model", choices=MODELS, default="smollm2")
    parser.add_argument("--steps", type=int, default=None, help="default 6 (ci profile: 4)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    parser.add_argument("--data", choices=DATA, default="blocks")
    parser.add_argument(
        "--rounds", type=int, default=None, help="interleaved rounds, fastest kept (default 2)"
    )
    args = parser.parse_args(argv)
    run(
        args.workloads,
        out=args.out,
        model=args.model,
        steps=args.steps,
        batch=args.batch,
        seq_len=args.seq_len,
        data=args.data,
        rounds=args.rounds,
    )
    return 0
