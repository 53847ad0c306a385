"""LoRA from scratch: the low-rank adapter in about a hundred readable lines.

Lesson 02.

Full fine-tuning updates a weight matrix W (shape d_out x d_in) directly. LoRA
(Hu et al., 2021, https://arxiv.org/abs/2106.09685) freezes W and learns the update
as the product of two thin matrices instead:

    h = W x + (alpha / r) * B A x

    A : r x d_in     initialised at random (Kaiming-uniform, like nn.Linear)
    B : d_out x r    initialised at zero, so at step 0 the model is unchanged

Only A and B are trained: r * (d_in + d_out) numbers instead of d_in * d_out.
With d_in = d_out = 576 and r = 8 that is 9,216 instead of 331,776 (about 2.8 %).

The factor alpha / r keeps the size of the update roughly independent of r, so
changing r does not force a new learning rate. rsLoRA (Kalajdzievski, 2023,
https://arxiv.org/abs/2312.03732) uses alpha / sqrt(r) instead, which behaves
better for large r.

Because B A is just a d_out x d_in matrix, it can be folded into W after training
("merging"): W' = W + (alpha / r) B A. The merged model is exactly as fast as the
original one.

This module mirrors what PEFT does for ``nn.Linear`` layers, with the same
initialisation and scaling, so the two give the same outputs for the same A and B:

    model = ...                                   # any torch model with nn.Linear layers
    inject_lora(model, ["q_proj", "v_proj"], r=8, alpha=16)
    count_trainable_parameters(model)             # (trainable, total)
    ...train...
    merge_lora(model)                             # fold B A into W for inference
"""

from __future__ import annotations

import math
from numbers import Integral

import torch
from peft.tuners.lora import LoraLayer
from torch import nn

from .checks import flag, fraction, positive_int, positive_number

__all__ = [
    "LoRALinear",
    "add_lora",
    "check_lora_layer",
    "check_rank_alpha",
    "copy_lora_weights_to_peft",
    "count_trainable_parameters",
    "first_step_update_norm",
    "inject_lora",
    "lora_parameter_count",
    "lora_parameter_table",
    "lora_scaling",
    "merge_lora",
    "unmerge_lora",
]


# -----------------------------------------------------------------------------
# Argument checks: one sentence saying what is wrong and what to do.


def check_model(model: object) -> nn.Module:
    """Return model if it is an nn.Module, else raise."""
    if not isinstance(model, nn.Module):
        raise TypeError(
            f"model must be a torch.nn.Module (got {type(model).__name__}); "
            "pass the model itself, e.g. AutoModelForCausalLM.from_pretrained(...)."
        )
    return model


def check_target_modules(target_modules: object) -> list[str]:
    """Return target_modules as a list of non-empty strings, else raise."""
    if isinstance(target_modules, str):
        raise TypeError(
            f"target_modules must be a list of module names (got the string {target_modules!r}); "
            f"wrap it in a list: [{target_modules!r}]."
        )
    if not isinstance(target_modules, list | tuple) or not target_modules:
        raise ValueError(
            f"target_modules must be a non-empty list of module names (got {target_modules!r}); "
            "try ['q_proj', 'v_proj']."
        )
    for name in target_modules:
        if not isinstance(name, str) or not name:
            raise TypeError(
                f"every entry of target_modules must be a non-empty string (got {name!r}); "
                "try ['q_proj', 'v_proj']."
            )
    return list(target_modules)


# -----------------------------------------------------------------------------
# The layer.


def check_rank_alpha(r: object, alpha: object) -> tuple[int, float]:
    """Return (r, alpha) as (int, float) if r is a positive integer and alpha a positive number."""
    return positive_int(r, "r", "r=8"), positive_number(alpha, "alpha", "alpha=2*r, e.g. alpha=16")


def check_lora_layer(
    base: object, r: object, alpha: object, dropout: object = 0.0, use_rslora: object = False
) -> None:
    """Raise, saying what to pass, unless LoRALinear(base, r, alpha, dropout, use_rslora) fits."""
    if not isinstance(base, nn.Linear):
        raise TypeError(
            f"base must be a torch.nn.Linear (got {type(base).__name__}); "
            "wrap a linear layer, e.g. LoRALinear(model.q_proj, r=8, alpha=16)."
        )
    if not base.weight.is_floating_point():
        raise TypeError(
            f"base.weight has dtype {base.weight.dtype}, but LoRALinear needs a floating-point "
            "weight; use PEFT for quantized (QLoRA) layers."
        )
    check_rank_alpha(r, alpha)
    fraction(dropout, "dropout", "dropout=0.05 or 0.0")
    flag(use_rslora, "use_rslora")


# The layer: lesson 02 writes this class in its own cell (tests/notebooks/test_from_scratch.py
# checks that the two are the same code).


class LoRALinear(nn.Module):
    """A frozen nn.Linear plus a trainable low-rank update (alpha / r) * B A."""

    def __init__(
        self,
        base: nn.Linear,
        r: int = 8,
        alpha: float = 16.0,
        dropout: float = 0.0,
        use_rslora: bool = False,
    ) -> None:
        super().__init__()
        check_lora_layer(base, r, alpha, dropout, use_rslora)  # a bad value fails here, in words
        self.r, self.alpha, self.use_rslora = int(r), float(alpha), use_rslora
        self.base = base  # the pretrained layer, kept as it is but frozen
        for param in self.base.parameters():
            param.requires_grad_(False)
        # The adapter, on the same device and with the same dtype as W.
        factory = {"device": base.weight.device, "dtype": base.weight.dtype}
        self.lora_A = nn.Parameter(torch.empty(self.r, base.in_features, **factory))
        self.lora_B = nn.Parameter(torch.empty(base.out_features, self.r, **factory))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False
        self.reset_lora_parameters()

    @property
    def in_features(self) -> int:
        """Input size of the wrapped layer (k)."""
        return self.base.in_features

    @property
    def out_features(self) -> int:
        """Output size of the wrapped layer (d)."""
        return self.base.out_features

    @property
    def scaling(self) -> float:
        """The factor in front of B A: alpha / r, or alpha / sqrt(r) with rsLoRA."""
        return self.alpha / (math.sqrt(self.r) if self.use_rslora else self.r)

    def reset_lora_parameters(self) -> None:
        """Initialise like PEFT: A Kaiming-uniform (as nn.Linear does), B zero, so B A = 0."""
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B)

    def delta_weight(self) -> torch.Tensor:
        """The update to W that the adapter stands for: (B @ A) * scaling, shape d x k."""
        return (self.lora_B @ self.lora_A) * self.scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """h = W x + b + scaling * B A dropout(x); just W x + b once merged."""
        if self.merged:
            return self.base(x)
        return self.base(x) + (self.dropout(x) @ self.lora_A.T @ self.lora_B.T) * self.scaling

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the update into W (W <- W + delta), so forward costs one matmul."""
        if self.merged:
            raise RuntimeError("this LoRALinear is already merged; call unmerge() first.")
        self.base.weight += self.delta_weight().to(self.base.weight.dtype)
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Take the update back out of W (W <- W - delta), with A and B as they were at merge."""
        if not self.merged:
            raise RuntimeError("this LoRALinear is not merged; call merge() first.")
        self.base.weight -= self.delta_weight().to(self.base.weight.dtype)
        self.merged = False

    def extra_repr(self) -> str:
        """Shown by print(model), next to the wrapped layer."""
        return (
            f"r={self.r}, alpha={self.alpha:g}, scaling={self.scaling:g}, "
            f"use_rslora={self.use_rslora}, merged={self.merged}"
        )


# -----------------------------------------------------------------------------
# Putting adapters into a whole model.


def _matches(name: str, target_modules: list[str]) -> bool:
    """True if the dotted name ends with one of the targets, e.g. 'layers.0.self_attn.q_proj'."""
    return any(name == t or name.endswith("." + t) for t in target_modules)


def _lora_layers(model: nn.Module) -> list[tuple[str, LoRALinear]]:
    """All (name, LoRALinear) pairs in the model, in module order.

    A LoRALinear is recognised by its own lora_A parameter (PEFT's layers hold a dict of them),
    so the class lesson 02 writes in its cell, the same code as this module's, counts too.
    """
    return [
        (n, m)
        for n, m in model.named_modules()
        if isinstance(getattr(m, "lora_A", None), nn.Parameter)
    ]


def inject_lora(
    model: nn.Module,
    target_modules: list[str],
    r: int,
    alpha: float,
    dropout: float = 0.0,
    use_rslora: bool = False,
) -> list[str]:
    """Wrap each targeted nn.Linear in a LoRALinear, freeze everything else, return the names.

    The arguments checked, the layers whose names end with a target are handed to `add_lora`
    (lesson 02 writes it, and `LoRALinear`, in its own cells).
    """
    check_model(model)
    targets = check_target_modules(target_modules)
    # Check the hyperparameters once here, so a bad value fails before the model is touched.
    r, alpha = check_rank_alpha(r, alpha)
    dropout, use_rslora = (
        fraction(dropout, "dropout", "dropout=0.05 or 0.0"),
        flag(use_rslora, "use_rslora"),
    )

    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    chosen = [n for n, _ in linears if _matches(n, targets)]
    if not chosen:
        if any(_matches(n, targets) for n, _ in _lora_layers(model)):
            raise ValueError(
                f"the modules {targets} already have LoRA adapters; "
                "inject_lora only once per model (or start again from a fresh model)."
            )
        suffixes = sorted({n.rsplit(".", 1)[-1] for n, _ in linears})
        raise ValueError(
            f"no nn.Linear module name ends with any of {targets}; the Linear layers of this model "
            f"end with {suffixes[:20]}, so pick target_modules from those."
        )

    add_lora(model, chosen, r, alpha, dropout, use_rslora)
    return chosen


def add_lora(
    model: nn.Module,
    names: list[str],
    r: int,
    alpha: float,
    dropout: float = 0.0,
    use_rslora: bool = False,
) -> None:
    """Freeze the model, then swap each named nn.Linear for a LoRALinear that wraps it."""
    for param in model.parameters():
        param.requires_grad_(False)  # the new A and B are the only trainable tensors
    for name in names:  # e.g. "model.layers.0.self_attn.q_proj"
        parent_name, _, child_name = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        base = getattr(parent, child_name)
        setattr(parent, child_name, LoRALinear(base, r, alpha, dropout, use_rslora))


def lora_parameter_count(d_out: int, d_in: int, r: int) -> int:
    """Trainable numbers LoRA adds to one d_out x d_in layer: r * (d_in + d_out)."""
    for name, value in (("d_out", d_out), ("d_in", d_in)):
        if isinstance(value, bool) or not isinstance(value, Integral) or value <= 0:
            raise ValueError(
                f"{name} must be a positive integer (got {value!r}); pass a layer size."
            )
    return positive_int(r, "r", "r=8") * (int(d_in) + int(d_out))


def count_trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """Return (trainable, total) numbers of parameters; shared tensors count once."""
    check_model(model)
    params = list(model.parameters())
    trainable = sum(p.numel() for p in params if p.requires_grad)
    total = sum(p.numel() for p in params)
    return trainable, total


def merge_lora(model: nn.Module) -> list[str]:
    """Merge every not-yet-merged LoRALinear of the model; return the names merged."""
    return _set_merged(model, merged=True)


def unmerge_lora(model: nn.Module) -> list[str]:
    """Unmerge every merged LoRALinear of the model; return the names unmerged."""
    return _set_merged(model, merged=False)


def _set_merged(model: nn.Module, merged: bool) -> list[str]:
    """Bring every LoRALinear of the model to the given merged state."""
    layers = _lora_layers(check_model(model))
    if not layers:
        raise ValueError(
            "this model has no LoRALinear layers; "
            "call inject_lora(model, target_modules, r, alpha) first."
        )
    changed = []
    for name, layer in layers:
        if layer.merged != merged:
            if merged:
                layer.merge()
            else:
                layer.unmerge()
            changed.append(name)
    return changed


# -----------------------------------------------------------------------------
# Lesson 02 helpers: the scale factor, parameter tables, PEFT interop, first-step size.


def lora_scaling(r: int, alpha: float, use_rslora: bool = False) -> float:
    """The factor in front of B A: alpha / r (LoRA) or alpha / sqrt(r) (rsLoRA)."""
    r, alpha = check_rank_alpha(r, alpha)
    return alpha / (math.sqrt(r) if flag(use_rslora, "use_rslora") else r)


def lora_parameter_table(
    layers: dict[str, nn.Linear | tuple[int, int]], r: int
) -> list[dict[str, object]]:
    """One row per layer: d_out, d_in, full d_out*d_in, LoRA r*(d_in+d_out) and their ratio.

    `layers` maps a name to an nn.Linear or to a (d_out, d_in) pair (the shape of its weight).
    """
    r = positive_int(r, "r", "r=8")
    if not isinstance(layers, dict) or not layers:
        raise ValueError(
            "layers must be a non-empty dict of name -> nn.Linear or (d_out, d_in); "
            "e.g. {'q_proj': model.model.layers[0].self_attn.q_proj}."
        )
    rows = []
    for name, layer in layers.items():
        if isinstance(layer, nn.Linear):
            d_out, d_in = layer.out_features, layer.in_features
        elif isinstance(layer, tuple) and len(layer) == 2:
            d_out, d_in = layer
        else:
            raise TypeError(
                f"layers[{name!r}] must be an nn.Linear or a (d_out, d_in) tuple "
                f"(got {type(layer).__name__}); pass the weight's shape as a tuple."
            )
        lora = lora_parameter_count(d_out, d_in, r)
        full = int(d_out) * int(d_in)
        rows.append(
            {
                "layer": name,
                "d_out": int(d_out),
                "d_in": int(d_in),
                "full": full,
                "lora": lora,
                "ratio": lora / full,
            }
        )
    return rows


def copy_lora_weights_to_peft(
    model: nn.Module, peft_model: nn.Module, adapter_name: str = "default"
) -> list[str]:
    """Copy A and B of every LoRALinear into the same-named PEFT LoRA layer; return the names."""
    ours = _lora_layers(check_model(model))
    if not ours:
        raise ValueError(
            "model has no LoRALinear layers; call inject_lora(model, target_modules, r, alpha) first."
        )
    base = peft_model.get_base_model() if hasattr(peft_model, "get_base_model") else peft_model
    theirs = {n: m for n, m in check_model(base).named_modules() if isinstance(m, LoraLayer)}
    missing = [n for n, _ in ours if n not in theirs]
    if missing:
        raise ValueError(
            f"the PEFT model has no LoRA layer named {missing[0]!r}; build it from the same base "
            "model with the same target_modules."
        )
    with torch.no_grad():
        for name, layer in ours:
            peft_layer = theirs[name]
            if adapter_name not in peft_layer.lora_A:
                raise ValueError(
                    f"PEFT layer {name!r} has no adapter {adapter_name!r} "
                    f"(it has {sorted(peft_layer.lora_A)}); pass adapter_name= one of those."
                )
            a, b = peft_layer.lora_A[adapter_name].weight, peft_layer.lora_B[adapter_name].weight
            if a.shape != layer.lora_A.shape or b.shape != layer.lora_B.shape:
                raise ValueError(
                    f"layer {name!r}: PEFT has r={a.shape[0]}, ours r={layer.r}; "
                    "use the same r in LoraConfig and inject_lora."
                )
            if not math.isclose(peft_layer.scaling[adapter_name], layer.scaling):
                raise ValueError(
                    f"layer {name!r}: PEFT scales by {peft_layer.scaling[adapter_name]:g}, "
                    f"ours by {layer.scaling:g}; use the same lora_alpha and use_rslora."
                )
            a.copy_(layer.lora_A)
            b.copy_(layer.lora_B)
    return [name for name, _ in ours]


def first_step_update_norm(
    r: int,
    alpha: float,
    use_rslora: bool = False,
    *,
    d_in: int = 576,
    d_out: int = 576,
    tokens: int = 64,
    seed: int = 0,
) -> float:
    """||ΔW||_F / lr after one Adam step of a freshly initialised LoRALinear (B = 0).

    The layer (d_out x d_in, SmolLM2's q_proj by default) has to learn a small rank-4 change of
    its weight from `tokens` random inputs; the synthetic task and A's initialisation are fixed by
    `seed`, so the number depends only on r, alpha and the scaling rule. Adam's first step moves
    every entry of B by about lr, so the result does not depend on lr.
    """
    r, alpha = check_rank_alpha(r, alpha)
    use_rslora = flag(use_rslora, "use_rslora")
    for name, value in (("d_in", d_in), ("d_out", d_out), ("tokens", tokens)):
        if isinstance(value, bool) or not isinstance(value, Integral) or value <= 0:
            raise ValueError(
                f"{name} must be a positive integer (got {value!r}); keep the default."
            )
    if r > min(d_in, d_out):
        raise ValueError(
            f"r={r} is larger than the layer allows (min(d_in, d_out) = {min(d_in, d_out)}); "
            "pick a smaller r."
        )
    if isinstance(seed, bool) or not isinstance(seed, Integral) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer (got {seed!r}); try seed=0.")
    lr = 1e-3
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        base = nn.Linear(d_in, d_out, bias=False)
        x = torch.randn(tokens, d_in)
        target_change = 0.1 * (torch.randn(d_out, 4) @ torch.randn(4, d_in)) / math.sqrt(d_in)
        with torch.no_grad():
            y = base(x) + x @ target_change.T
        torch.manual_seed(seed + 1)  # A's initialisation, the same stream for both rules
        layer = LoRALinear(base, r=r, alpha=alpha, use_rslora=use_rslora)
    optimizer = torch.optim.Adam([layer.lora_A, layer.lora_B], lr=lr)
    loss = (layer(x) - y).square().sum(dim=-1).mean()
    loss.backward()
    optimizer.step()
    return float(torch.linalg.matrix_norm(layer.delta_weight().detach())) / lr
