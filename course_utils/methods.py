"""The LoRA zoo: change one line (the method's name), get another parameter-efficient method.

Lesson 12 reads this module. Every method here is a variation on LoRA's ΔW = s · B A
(Hu et al., 2021, arXiv:2106.09685) that changes *one* thing:

=============  ==============================================================  ==========
method         what changes                                                    arXiv
=============  ==============================================================  ==========
lora           nothing: the reference, s = alpha / r                           2106.09685
rslora         the scale: s = alpha / sqrt(r)                                  2312.03732
dora           the weight is split into a trained magnitude and a direction    2402.09353
vera           frozen shared random A and B; only two vectors per layer train  2310.11454
lora+          the optimizer: B learns lr_ratio times faster than A            2402.12354
lora-fa        A stays frozen at its random init; only B trains                2308.03303
pissa          the init: A, B from the top-r singular vectors of W             2404.02948
delta-lora     W itself also moves, by the change of B A after each step       2309.02411
=============  ==============================================================  ==========

The API is four calls, the same for every method:

    model = methods.apply_method(base_model, "dora", r=16, alpha=32)
    optimizer = methods.make_optimizer("dora", model, learning_rate=1e-3)   # None: AdamW
    callbacks = methods.make_callbacks("dora", model)                       # [] but Delta-LoRA
    trainer = SFTTrainer(model=model, ..., optimizers=(optimizer, None), callbacks=callbacks)

and `trainable_parameter_formula` says from the shapes alone how many numbers each one trains.
PEFT (0.21) implements all of them but Delta-LoRA, which `course_utils.delta_lora` builds on
`course_utils.lora`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from numbers import Real
from typing import Any

import torch
from peft import LoraConfig, PeftModel, VeraConfig, get_peft_model
from peft.optimizers import create_lorafa_optimizer, create_loraplus_optimizer

from . import delta_lora, memory
from .checks import one_of, positive_int, positive_number

__all__ = [
    "METHODS",
    "Method",
    "apply_method",
    "describe_config",
    "make_adapter_config",
    "make_callbacks",
    "make_optimizer",
    "trainable_parameter_formula",
]


@dataclass(frozen=True)
class Method:
    """One entry of the zoo: its name, the paper, and what it changes in a few words."""

    name: str
    arxiv: str
    changes: str
    library: str  # who implements it here: "peft" or "course_utils"


#: Every method the zoo knows, by the name `make_adapter_config` and friends take.
METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method("lora", "2106.09685", "ΔW = (alpha/r)·B·A, B = 0 at the start", "peft"),
        Method("rslora", "2312.03732", "scale alpha/sqrt(r) instead of alpha/r", "peft"),
        Method("dora", "2402.09353", "W = m · (W0 + B·A)/‖W0 + B·A‖, m trained", "peft"),
        Method("vera", "2310.11454", "frozen shared random A, B; trains vectors b, d", "peft"),
        Method("lora+", "2402.12354", "B's learning rate = ratio × A's", "peft"),
        Method("lora-fa", "2308.03303", "A frozen at its random init; trains B only", "peft"),
        Method("pissa", "2404.02948", "A, B = top-r SVD of W; W keeps the residual", "peft"),
        Method("delta-lora", "2309.02411", "W += λ·Δ(B·A) after each step", "course_utils"),
    )
}

#: LoRA+'s default ratio of B's learning rate to A's (the paper suggests 2**4 as a start).
LORAPLUS_LR_RATIO = 16.0


# --------------------------------------------------------------------------------------------
# Argument checks: one sentence saying what is wrong and what to do.
# --------------------------------------------------------------------------------------------


def _check_targets(target_modules: object) -> str | list[str]:
    """Return 'all-linear' or a list of layer names, else raise."""
    if target_modules == "all-linear":
        return "all-linear"
    if (
        isinstance(target_modules, str)
        or not isinstance(target_modules, Sequence)
        or not target_modules
        or not all(isinstance(t, str) and t for t in target_modules)
    ):
        raise ValueError(
            f"target_modules must be 'all-linear' or a list of layer names "
            f"(got {target_modules!r}); try target_modules=['q_proj', 'v_proj']."
        )
    return list(target_modules)


def _targets_of(target_modules: object) -> tuple[str, ...]:
    """The Llama layer names that 'all-linear' or a list stands for."""
    targets = _check_targets(target_modules)
    if targets == "all-linear":
        return memory.LLAMA_LINEAR_LAYERS
    unknown = [t for t in targets if t not in memory.LLAMA_LINEAR_LAYERS]
    if unknown:
        raise ValueError(
            f"unknown layer {unknown[0]!r}; choose from {list(memory.LLAMA_LINEAR_LAYERS)} "
            "or 'all-linear'."
        )
    return tuple(dict.fromkeys(targets))


# --------------------------------------------------------------------------------------------
# 1. The configuration: one line per method.
# --------------------------------------------------------------------------------------------


def make_adapter_config(
    method: str,
    r: int = 16,
    alpha: float = 32,
    target_modules: str | Sequence[str] = "all-linear",
    **overrides: Any,
):
    """Return the adapter config for `method`: a PEFT LoraConfig/VeraConfig or a DeltaLoRAConfig.

    `overrides` set any other field of that config (e.g. ``lora_dropout=0.05``,
    ``d_initial=0.1`` for VeRA, ``update_ratio=2.0`` or ``start_steps=100`` for Delta-LoRA).
    """
    method = one_of(method, "method", METHODS)
    r = positive_int(r, "r (the rank)", "r=16")
    alpha = positive_number(alpha, "alpha", "alpha=2*r")
    targets = _check_targets(target_modules)
    if method == "delta-lora":
        fields = {"r": r, "alpha": alpha, "target_modules": targets, **overrides}
        return _build(delta_lora.DeltaLoRAConfig, method, fields)
    if method == "vera":
        # VeRA has no alpha: the trained vectors b and d set the scale.
        fields = {"r": r, "target_modules": targets, "task_type": "CAUSAL_LM", **overrides}
        return _build(VeraConfig, method, fields)
    fields = {
        "r": r,
        "lora_alpha": alpha,
        "lora_dropout": 0.0,
        "target_modules": targets,
        "bias": "none",
        "task_type": "CAUSAL_LM",
        "use_rslora": method == "rslora",
        "use_dora": method == "dora",
        # PiSSA with 4 subspace iterations of a randomized SVD: seconds on a CPU, and the
        # PiSSA paper shows it lands next to the exact SVD.
        "init_lora_weights": "pissa_niter_4" if method == "pissa" else True,
    }
    fields.update(overrides)
    return _build(LoraConfig, method, fields)


def _build(cls, method: str, fields: dict[str, Any]):
    """Build config class `cls` from `fields`, naming a field that does not exist."""
    try:
        return cls(**fields)
    except TypeError as error:
        raise ValueError(
            f"{method}: {error}; pass only fields of {cls.__name__} as overrides."
        ) from None


# --------------------------------------------------------------------------------------------
# 2. The model, the optimizer and the per-step hook.
# --------------------------------------------------------------------------------------------


def apply_method(
    model,
    method: str,
    r: int = 16,
    alpha: float = 32,
    target_modules: str | Sequence[str] = "all-linear",
    *,
    verbose: bool = True,
    **overrides: Any,
):
    """Wrap a fresh base model for `method` and return the model to train (A frozen for LoRA-FA).

    The PEFT methods go through PEFT's own ``get_peft_model`` with the config
    `make_adapter_config` builds; with `verbose` the config is printed, its fields that differ
    from the config class's defaults, so the one-line switch never hides what it built.
    """
    method = one_of(method, "method", METHODS)
    config = make_adapter_config(
        method, r=r, alpha=alpha, target_modules=target_modules, **overrides
    )
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a transformers model (got {type(model).__name__}).")
    if getattr(model, "peft_config", None) or delta_lora.delta_lora_layers(model):
        raise ValueError(
            "This model already has adapters; load a fresh base model with from_pretrained."
        )
    if verbose:
        extra = {
            "lora+": "; optimizer: peft.optimizers.create_loraplus_optimizer (make_optimizer)",
            "lora-fa": "; A frozen, optimizer: peft.optimizers.create_lorafa_optimizer",
            "delta-lora": "; W moved after each step by a TrainerCallback (make_callbacks)",
        }
        print(f"{method}: {describe_config(config)}{extra.get(method, '')}")
    if method == "delta-lora":
        delta_lora.inject_delta_lora(model, config)
        model.train()
        return model
    peft_model = get_peft_model(model, config)
    if method == "lora-fa":
        for name, param in peft_model.named_parameters():
            if "lora_A" in name:
                param.requires_grad_(False)  # LoRA-FA: A stays at its random init
    return peft_model


def describe_config(config) -> str:
    """Return ``ClassName(field=value, ...)`` with the fields that differ from the class defaults."""
    if not dataclasses.is_dataclass(config):
        raise TypeError(
            f"config must be an adapter config dataclass (got {type(config).__name__})."
        )
    defaults = type(config)()
    changed = {
        f.name: getattr(config, f.name)
        for f in dataclasses.fields(config)
        if f.repr and getattr(config, f.name) != getattr(defaults, f.name)
    }
    if not changed:  # the class's own defaults: show them all
        return repr(config)
    return f"{type(config).__name__}({', '.join(f'{k}={v!r}' for k, v in changed.items())})"


def make_optimizer(
    method: str,
    model,
    learning_rate: float = 1e-3,
    *,
    loraplus_lr_ratio: float = LORAPLUS_LR_RATIO,
) -> torch.optim.Optimizer | None:
    """Return the optimizer `method` needs, or None when the trainer's AdamW is the method's.

    LoRA+: PEFT's ``create_loraplus_optimizer`` (AdamW, B at ``loraplus_lr_ratio`` × the rate).
    LoRA-FA: PEFT's ``create_lorafa_optimizer`` (A frozen, B's gradient projected).
    """
    method = one_of(method, "method", METHODS)
    learning_rate = positive_number(learning_rate, "learning_rate", "learning_rate=1e-3")
    ratio = loraplus_lr_ratio
    if isinstance(ratio, bool) or not isinstance(ratio, Real) or not ratio >= 1:
        raise ValueError(
            f"loraplus_lr_ratio must be a number >= 1 (got {ratio!r}); try loraplus_lr_ratio=16."
        )
    if method not in ("lora+", "lora-fa"):
        return None

    if not isinstance(model, PeftModel):
        raise ValueError(
            f"{method} needs the PEFT model; build it with apply_method(model, {method!r}) first."
        )
    if method == "lora+":
        return create_loraplus_optimizer(
            model,
            torch.optim.AdamW,
            lr=learning_rate,
            loraplus_lr_ratio=float(ratio),
            weight_decay=0.0,
        )

    config = model.peft_config[model.active_adapter]
    return create_lorafa_optimizer(
        model, r=config.r, lora_alpha=config.lora_alpha, lr=learning_rate, weight_decay=0.0
    )


def make_callbacks(method: str, model) -> list:
    """Return the TrainerCallbacks `method` needs: Delta-LoRA's W update, nothing for the rest."""
    method = one_of(method, "method", METHODS)
    if method != "delta-lora":
        return []
    return [delta_lora.DeltaLoRAUpdater(model).callback()]


# --------------------------------------------------------------------------------------------
# 3. What each method trains, from the shapes alone.
# --------------------------------------------------------------------------------------------


def trainable_parameter_formula(
    model_config: object,
    method: str,
    r: int = 16,
    targets: str | Sequence[str] = "all-linear",
) -> int:
    """Numbers `method` trains on a Llama-style model, computed from the layer shapes (not PEFT).

    Per targeted layer of shape d_out x d_in: LoRA and the variants that keep its factors (rsLoRA,
    LoRA+, PiSSA, Delta-LoRA) r·(d_in + d_out); DoRA adds the magnitude, d_out; LoRA-FA trains B
    only, r·d_out; VeRA trains the vectors b (d_out) and d (r) over frozen shared A and B.
    """
    method = one_of(method, "method", METHODS)
    r = positive_int(r, "r (the rank)", "r=16")
    cfg = memory.get_config(model_config)
    shapes = memory.linear_layer_shapes(cfg)  # name -> (d_in, d_out)
    names = _targets_of(targets)
    if method not in ("vera", "lora-fa", "dora"):
        return memory.lora_trainable_params(cfg, r=r, targets=list(names))  # r·(d_in + d_out)
    per_layer = 0
    for name in names:
        d_in, d_out = shapes[name]
        if method == "vera":
            per_layer += d_out + r
        elif method == "lora-fa":
            per_layer += r * d_out
        else:  # dora
            per_layer += r * (d_in + d_out) + d_out
    return cfg["num_hidden_layers"] * per_layer
