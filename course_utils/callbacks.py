"""What a training run measured, as a ``TrainerCallback`` you hand to any Hugging Face trainer.

Lessons 05-07 and 10-15 hand it to TRL's trainers.

The labs build TRL's ``SFTTrainer`` and ``DPOTrainer`` themselves; the course adds one thing to
them, through the trainer's own ``callbacks=[...]`` argument:

    meter = callbacks.TrainingMeter("LoRA r=16", measure_memory=True)
    trainer = SFTTrainer(model=model, args=config, train_dataset=train_set,
                         processing_class=tokenizer, callbacks=[meter])
    trainer.train()
    meter.result.seconds_per_step, meter.result.peak_memory, meter.result.losses

`TrainingMeter` records the loss of every logged step (draws it live in a notebook), the wall
time of every optimizer step, the tokens the trainer counted, the trainable and total
parameters, and, with ``measure_memory=True``, the peak bytes of live tensors over two
steady-state steps (`course_utils.peak_memory.PeakMemory`: weights, AdamW's states, activations
and gradients together). `plot_losses` draws finished runs side by side.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import matplotlib.pyplot as plt
import torch
from IPython.display import display
from transformers import TrainerCallback

from .memory import measure_model_bytes
from .peak_memory import PeakMemory

__all__ = ["TrainResult", "TrainingMeter", "count_parameters", "plot_losses"]

MB = 2**20
#: The steps whose peak memory is measured: AdamW creates its two moments in the first step, so
#: from step 2 on weights, optimizer states, activations and gradients live together.
MEMORY_STEPS = (2, 3)


def count_parameters(model) -> tuple[int, int]:
    """Return (trainable, total) parameter counts; a 4-bit weight counts as the weights it holds."""
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch model (got {type(model).__name__}).")
    trainable = total = 0
    for param in model.parameters():
        n = param.numel()
        if type(param).__name__ == "Params4bit":
            n = int(math.prod(param.quant_state.shape)) if param.quant_state is not None else 2 * n
        total += n
        if param.requires_grad:
            trainable += n
    return trainable, total


@dataclass
class TrainResult:
    """What one training run measured."""

    label: str
    steps: int = 0
    batch_size: int = 0
    seconds: float = 0.0
    losses: list[float] = field(default_factory=list)
    tokens: int = 0
    trainable_params: int = 0
    total_params: int = 0
    peak_memory: int | None = None
    device: str = "cpu"
    step_seconds: list[float] = field(default_factory=list)

    @property
    def first_loss(self) -> float:
        """The loss of the first logged step."""
        return self.losses[0]

    @property
    def final_loss(self) -> float:
        """The mean loss of the last few logged steps (a tenth of the run, at least one)."""
        tail = self.losses[-max(1, len(self.losses) // 10) :]
        return sum(tail) / len(tail)

    @property
    def seconds_per_step(self) -> float:
        """Median wall time of the steps after MEMORY_STEPS (step 1 warms up, 2-3 may be profiled).

        A run of MEMORY_STEPS[-1] steps or fewer has no such step: the median of all its steps.
        """
        if not self.step_seconds:
            return self.seconds / max(self.steps, 1)
        settled = self.step_seconds[MEMORY_STEPS[-1] :] or self.step_seconds
        ordered = sorted(settled)
        return ordered[len(ordered) // 2]

    @property
    def tokens_per_second(self) -> float:
        """Tokens (padding excluded) per second of a typical step (median step time)."""
        per_step = self.tokens / max(self.steps, 1)
        return per_step / self.seconds_per_step if self.seconds_per_step > 0 else 0.0

    def summary(self) -> dict[str, Any]:
        """Return the headline numbers as a flat dict (for a table)."""
        return {
            "run": self.label,
            "trainable params": self.trainable_params,
            "steps": self.steps,
            "s/step": round(self.seconds_per_step, 2),
            "tokens/s": round(self.tokens_per_second, 1),
            "first loss": round(self.first_loss, 4),
            "final loss": round(self.final_loss, 4),
            "peak MB": None if self.peak_memory is None else round(self.peak_memory / MB, 1),
        }


class TrainingMeter(TrainerCallback):
    """A TrainerCallback that records losses, step times, tokens and (optionally) peak memory.

    After ``trainer.train()`` the numbers are in ``meter.result`` (a `TrainResult`). In a Jupyter
    notebook the loss curve is redrawn under the cell after every logged step (``live_plot``);
    give the trainer ``logging_steps=1`` to log, and so draw, every step.
    """

    def __init__(
        self, label: str = "training", *, live_plot: bool = True, measure_memory: bool = False
    ):
        """Prepare an empty record named `label` (the legend of the live plot)."""
        if not isinstance(label, str) or not label:
            raise ValueError("label must be a non-empty string such as 'LoRA r=16'.")
        for name, value in (("live_plot", live_plot), ("measure_memory", measure_memory)):
            if not isinstance(value, bool):
                raise TypeError(f"{name} must be True or False (got {value!r}).")
        self.result = TrainResult(label=label)
        self.live_plot = live_plot
        self.measure_memory = measure_memory
        self._handle = None
        self._started = 0.0
        self._step_started = 0.0
        self._meter: PeakMemory | None = None
        self._base = 0
        self._model = None

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        """Note the run's size and the model's parameters; start the clock."""
        if self.result.losses or self.result.step_seconds:
            raise RuntimeError(
                "This TrainingMeter has measured a run already; give each trainer a new one."
            )
        self._model = model
        if model is not None:
            self.result.trainable_params, self.result.total_params = count_parameters(model)
            self.result.device = next(model.parameters()).device.type
        self.result.batch_size = args.per_device_train_batch_size
        self._started = time.perf_counter()

    def on_step_begin(self, args, state, control, **kwargs):
        """Start the step's clock, and the memory meter before the first measured step."""
        first, _ = MEMORY_STEPS
        if self.measure_memory and self._meter is None and state.global_step == first - 1:
            optimizer = kwargs.get("optimizer")
            states = _optimizer_state_bytes(optimizer) if optimizer is not None else 0
            self._base = measure_model_bytes(self._model) + states
            self._meter = PeakMemory("cuda" if self.result.device == "cuda" else "cpu")
            self._meter.__enter__()
        self._step_started = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        """Record the step's wall time; stop the memory meter after the last measured step."""
        self.result.step_seconds.append(time.perf_counter() - self._step_started)
        self.result.steps = state.global_step
        _, last = MEMORY_STEPS
        if self._meter is not None and self.result.peak_memory is None:
            if state.global_step in (last, state.max_steps):
                self._meter.__exit__(None, None, None)
                self.result.peak_memory = self._base + max(self._meter.peak or 0, 0)

    def on_log(self, args, state, control, logs=None, **kwargs):
        """Keep the logged training loss (and the token count TRL logs); redraw the plot."""
        if not logs or "loss" not in logs:
            return
        self.result.losses.append(float(logs["loss"]))
        if "num_tokens" in logs:
            self.result.tokens = int(logs["num_tokens"])
        if self.live_plot and _in_notebook():
            self._handle = _draw_live(self.result, state.max_steps, self._handle)

    def on_train_end(self, args, state, control, **kwargs):
        """Stop the clock; take the trainer's token count where TRL logged none."""
        self.result.seconds = time.perf_counter() - self._started
        self.result.steps = state.global_step
        if not self.result.tokens and getattr(state, "num_input_tokens_seen", 0):
            self.result.tokens = int(state.num_input_tokens_seen)
        if self._meter is not None and self.result.peak_memory is None:
            self._meter.__exit__(None, None, None)  # a run shorter than the measured steps
            self.result.peak_memory = self._base + max(self._meter.peak or 0, 0)
        self._model = None


def _optimizer_state_bytes(optimizer) -> int:
    """Bytes of the tensors an optimizer keeps (AdamW: two moments per trainable value)."""
    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate wraps it
    return sum(
        value.numel() * value.element_size()
        for state in inner.state.values()
        for value in state.values()
        if isinstance(value, torch.Tensor)
    )


def _in_notebook() -> bool:
    """Say whether we run inside a Jupyter kernel (where a live plot can be redrawn)."""
    try:
        from IPython import get_ipython
    except ImportError:  # pragma: no cover - IPython comes with jupyter
        return False
    shell = get_ipython()
    return shell is not None and shell.__class__.__name__ == "ZMQInteractiveShell"


def _draw_live(result: TrainResult, max_steps: int, handle):
    """Redraw the loss curve in place in the notebook output; return the display handle."""
    figure = plot_losses({result.label: result.losses}, max_steps=max_steps)
    if handle is None:
        handle = display(figure, display_id=True)
    else:
        handle.update(figure)
    plt.close(figure)
    return handle


def plot_losses(runs: dict[str, Sequence[float]], max_steps: int | None = None, ax=None):
    """Plot the training loss of one or more runs ({label: losses per step}); return the figure."""
    if not isinstance(runs, dict) or not runs:
        raise ValueError(
            "runs must be a dict {label: [loss per step]}, e.g. {'lora': meter.result.losses}."
        )
    if ax is None:
        figure, ax = plt.subplots(figsize=(6, 3.2))
    else:
        figure = ax.figure
    for label, losses in runs.items():
        ax.plot(
            range(1, len(losses) + 1),
            list(losses),
            label=label,
            marker="." if len(losses) < 30 else None,
        )
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.set_yscale("log")
    if max_steps:
        ax.set_xlim(0.5, max_steps + 0.5)
    ax.grid(alpha=0.3)
    ax.legend()
    figure.tight_layout()
    return figure
