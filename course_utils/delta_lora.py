"""Delta-LoRA: LoRA that also moves the frozen weight W by the change of the product B A.

Lesson 12.

Delta-LoRA (Zi et al., 2023, https://arxiv.org/abs/2309.02411) is not in PEFT, so the course
builds it on its own `course_utils.lora.LoRALinear`. The layer is plain LoRA,

    h = W x + s · B A x          s = alpha / r

trained by AdamW as usual. After every optimizer step t (counted from 0) with t > K, the
pretrained weight gets the *change* of the low-rank product, times an update ratio λ
(Algorithm 1 of the paper):

    W(t+1) = W(t) + λ · s · (B(t+1) A(t+1) − B(t) A(t))

W gets no gradient and no optimizer state, so training costs what LoRA costs (plus one copy
of A and B per layer to remember the product before the step), but W's total change is no
longer bounded to rank r. Two details from the paper: the LoRA branch has **no dropout** (with
dropout, the gradient of B A is not the gradient W would get, and the update stops being a
surrogate for it), and W only starts moving after K warm-up steps ("start steps").

Because W changes, the trained model is W(T) + s · B A: you keep the merged weights, not a small
adapter file.

    config = DeltaLoRAConfig(r=16, alpha=32, target_modules=["q_proj", "v_proj"])
    inject_delta_lora(model, config)
    updater = DeltaLoRAUpdater(model)
    for t, batch in enumerate(batches):
        loss = model(**batch).loss
        loss.backward()
        updater.before_step()
        optimizer.step()
        updater.after_step(t)
        optimizer.zero_grad()

`updater.callback()` does the same inside a transformers/TRL trainer (``train.train(callbacks=...)``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from numbers import Integral, Real

import torch
from torch import nn
from transformers import TrainerCallback

from . import lora

__all__ = [
    "DeltaLoRAConfig",
    "DeltaLoRAUpdater",
    "delta_lora_layers",
    "inject_delta_lora",
]

#: The attribute `inject_delta_lora` leaves on the model (like PEFT's ``model.peft_config``).
CONFIG_ATTRIBUTE = "delta_lora_config"


@dataclass
class DeltaLoRAConfig:
    """The hyperparameters of Delta-LoRA: LoRA's r, alpha and targets, plus λ and K."""

    r: int = 16
    alpha: float = 32.0
    target_modules: list[str] | str = field(default_factory=lambda: "all-linear")
    update_ratio: float = 2.0
    start_steps: int = 0

    def __post_init__(self) -> None:
        """Check every field, so a bad value fails before a model is touched."""
        self.r, self.alpha = lora.check_rank_alpha(self.r, self.alpha)
        if self.target_modules != "all-linear":
            self.target_modules = lora.check_target_modules(self.target_modules)
        ratio = self.update_ratio
        if isinstance(ratio, bool) or not isinstance(ratio, Real) or not math.isfinite(ratio):
            raise ValueError(
                f"update_ratio must be a finite number (got {ratio!r}); try update_ratio=2.0."
            )
        if ratio < 0:
            raise ValueError(f"update_ratio must be >= 0 (got {ratio!r}); try update_ratio=2.0.")
        self.update_ratio = float(ratio)
        k = self.start_steps
        if isinstance(k, bool) or not isinstance(k, Integral) or k < 0:
            raise ValueError(f"start_steps must be an integer >= 0 (got {k!r}); try start_steps=0.")
        self.start_steps = int(k)

    @property
    def scaling(self) -> float:
        """The factor s = alpha / r in front of B A."""
        return self.alpha / self.r


def _all_linear_targets(model: nn.Module) -> list[str]:
    """The names of the model's nn.Linear layers except the output head (PEFT's 'all-linear')."""
    names = {
        name.rsplit(".", 1)[-1]
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] != "lm_head"
    }
    if not names:
        raise ValueError("this model has no nn.Linear layers; pass target_modules by name.")
    return sorted(names)


def inject_delta_lora(model: nn.Module, config: DeltaLoRAConfig) -> list[str]:
    """Put a dropout-free LoRALinear on each targeted layer, remember `config`; return the names."""
    lora.check_model(model)
    if not isinstance(config, DeltaLoRAConfig):
        raise TypeError(
            f"config must be a DeltaLoRAConfig (got {type(config).__name__}); "
            "build one with DeltaLoRAConfig(r=16, alpha=32)."
        )
    targets = (
        _all_linear_targets(model)
        if config.target_modules == "all-linear"
        else list(config.target_modules)
    )
    names = lora.inject_lora(model, targets, r=config.r, alpha=config.alpha, dropout=0.0)
    setattr(model, CONFIG_ATTRIBUTE, config)
    return names


def delta_lora_layers(model: nn.Module) -> list[tuple[str, lora.LoRALinear]]:
    """The (name, LoRALinear) pairs that `inject_delta_lora` put into the model."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, lora.LoRALinear)]


class DeltaLoRAUpdater:
    """Applies W += λ·s·(B'A' − BA) around each optimizer step of a Delta-LoRA model."""

    def __init__(self, model: nn.Module) -> None:
        lora.check_model(model)
        config = getattr(model, CONFIG_ATTRIBUTE, None)
        layers = delta_lora_layers(model)
        if config is None or not layers:
            raise ValueError(
                "this model has no Delta-LoRA layers; call inject_delta_lora(model, config) first."
            )
        if any(not isinstance(layer.dropout, nn.Identity) for _, layer in layers):
            raise ValueError(
                "Delta-LoRA needs LoRA layers without dropout; inject them with inject_delta_lora."
            )
        self.config: DeltaLoRAConfig = config
        self.layers = [layer for _, layer in layers]
        self._before: list[tuple[torch.Tensor, torch.Tensor]] | None = None
        self.updates = 0

    @torch.no_grad()
    def before_step(self) -> None:
        """Remember A and B as they are before the optimizer step (small copies, not B A)."""
        self._before = [(m.lora_A.detach().clone(), m.lora_B.detach().clone()) for m in self.layers]

    @torch.no_grad()
    def after_step(self, step: int) -> bool:
        """After optimizer step `step` (0-based): if step > K, move W; return whether it moved."""
        if isinstance(step, bool) or not isinstance(step, Integral) or step < 0:
            raise ValueError(f"step must be an integer >= 0 (got {step!r}); count steps from 0.")
        if self._before is None:
            raise RuntimeError("call before_step() before the optimizer step, then after_step().")
        before, self._before = self._before, None
        if step <= self.config.start_steps or self.config.update_ratio == 0:
            return False
        factor = self.config.update_ratio * self.config.scaling
        for layer, (a_old, b_old) in zip(self.layers, before):
            weight = layer.base.weight
            # W += λ s (B' A' − B A), as two rank-r products: no d_out x d_in temporary.
            weight.addmm_(
                layer.lora_B.to(weight.dtype), layer.lora_A.to(weight.dtype), alpha=factor
            )
            weight.addmm_(b_old.to(weight.dtype), a_old.to(weight.dtype), alpha=-factor)
        self.updates += 1
        return True

    def callback(self):
        """A transformers TrainerCallback that runs this updater around every optimizer step."""
        updater = self

        class DeltaLoRACallback(TrainerCallback):
            """Delta-LoRA's W update inside Trainer: state.global_step is t during the step."""

            def on_pre_optimizer_step(self, args, state, control, **kwargs):
                updater.before_step()

            def on_optimizer_step(self, args, state, control, **kwargs):
                updater.after_step(state.global_step)

        return DeltaLoRACallback()
