"""Interactive explorers for the theory lessons (ipywidgets).

Lessons 02 and 03.

Each widget is a thin layer over a plain function that computes the numbers it shows, so every
explorer also works without a browser: call the function, get the numbers.
"""

from __future__ import annotations

import base64
import html
import io

import ipywidgets as widgets
from matplotlib.figure import Figure

from course_utils import memory, sharding
from course_utils.checks import one_of, positive_int
from course_utils.lora import first_step_update_norm, lora_parameter_count, lora_scaling
from course_utils.spectrum import (
    check_rank,
    energy_captured,
    energy_curve,
    singular_values,
    tail_norm,
)

# ---------------------------------------------------------------------------------------------
# LoRA: rank explorer and alpha explorer (lesson 02)
# ---------------------------------------------------------------------------------------------
#
# rank_stats(delta, r)            -> dict   what keeping rank r of a ΔW costs and captures
# format_rank_stats(stats)        -> str    the one line the rank explorer shows
# rank_explorer(delta)            -> VBox   slider "rank r" + text (CSS class course-rank-stats) + plot
# alpha_stats(r, alpha, rslora)   -> dict   effective scale and first-step update norm
# format_alpha_stats(stats)       -> str    the one line the alpha explorer shows
# alpha_explorer()                -> VBox   sliders "rank r", "alpha α", checkbox "rsLoRA" + text
#                                           (CSS class course-alpha-stats) + plot

#: CSS class of the HTML widget that shows :func:`format_rank_stats` text (browser tests read it).
RANK_STATS_CLASS = "course-rank-stats"
#: CSS class of the HTML widget that shows :func:`format_alpha_stats` text.
ALPHA_STATS_CLASS = "course-alpha-stats"
#: The largest r the alpha explorer's update-norm experiment allows (SmolLM2's hidden size).
ALPHA_MAX_RANK = 576
_UPDATE_NORMS: dict[tuple[int, float, bool], float] = {}


def _lora_check_stats(stats: object, keys: tuple[str, ...], maker: str) -> None:
    """Raise if stats is not a dict holding the given keys."""
    if not isinstance(stats, dict):
        raise TypeError(f"stats must be the dict {maker}() returns, got {type(stats).__name__}.")
    missing = [key for key in keys if key not in stats]
    if missing:
        raise ValueError(f"stats lacks {missing}; pass the dict {maker}() returns.")


def _lora_check_limit(value: object, name: str, upper: int) -> int:
    """Return value if it is an int in [1, upper], else raise."""
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= upper:
        raise ValueError(f"{name} must be an integer between 1 and {upper} (got {value!r}).")
    return value


def _lora_show(out, fig, text: str) -> None:
    """Show a matplotlib Figure as a PNG in an Output widget (no pyplot, works without a kernel)."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=80)
    png = base64.b64encode(buffer.getvalue()).decode("ascii")
    out.outputs = (
        {
            "output_type": "display_data",
            "data": {"image/png": png, "text/plain": text},
            "metadata": {},
        },
    )


def rank_stats(delta, r: int) -> dict:
    """Exactly the numbers the rank explorer shows for keeping the top r directions of `delta`.

    ``reconstruction_error`` is relative, ||ΔW - ΔW_r||_F / ||ΔW||_F = sqrt(tail σ² / all σ²);
    ``absolute_error`` is ||ΔW - ΔW_r||_F; ``energy_captured`` is top-r Σσ² / Σσ² (a fraction);
    ``lora_parameters`` is r (d_out + d_in) and ``full_parameters`` d_out d_in.
    """
    sigmas = singular_values(delta)  # checks delta is a real 2-D matrix
    d_out, d_in = (int(n) for n in delta.shape)
    r = check_rank(r, min(d_out, d_in), f"a {d_out} x {d_in} matrix")
    norm = float(sigmas.square().sum().sqrt())
    if norm == 0:
        raise ValueError("delta is all zeros, so there is nothing to approximate; pass a real ΔW.")
    absolute = tail_norm(sigmas, r)
    return {
        "r": r,
        "shape": (d_out, d_in),
        "reconstruction_error": absolute / norm,
        "absolute_error": absolute,
        "energy_captured": energy_captured(sigmas, r),
        "lora_parameters": lora_parameter_count(d_out, d_in, r),
        "full_parameters": d_out * d_in,
    }


def format_rank_stats(stats: dict) -> str:
    """The rank explorer's line: ``rank r = 8 · reconstruction error = 0.1234 · ...``."""
    _lora_check_stats(
        stats, ("r", "reconstruction_error", "energy_captured", "lora_parameters"), "rank_stats"
    )
    return (
        f"rank r = {stats['r']} · reconstruction error = {stats['reconstruction_error']:.4f} · "
        f"energy captured = {100 * stats['energy_captured']:.2f} % · "
        f"LoRA parameters = {stats['lora_parameters']:,}"
    )


def _rank_figure(sigmas, curve, stats: dict, title: str):
    """Spectrum with the kept values highlighted, and the energy curve with r marked."""
    k, n = stats["r"], len(sigmas)
    fig = Figure(figsize=(10, 3.4))
    left, right = fig.subplots(1, 2)
    ranks = list(range(1, n + 1))
    left.semilogy(ranks, sigmas, color="lightgray", lw=2, label="dropped")
    left.semilogy(ranks[:k], sigmas[:k], color="C0", lw=2, label=f"kept (top {k})")
    left.set(xlabel="index i", ylabel="σ_i", title=f"singular values of {title}", xscale="log")
    left.legend()
    right.plot(ranks, [100 * c for c in curve], color="C0")
    right.axvline(k, color="C3", ls="--")
    right.plot([k], [100 * stats["energy_captured"]], "o", color="C3")
    right.set(xlabel="rank r", ylabel="energy captured (%)", ylim=(0, 101), xscale="log")
    right.set_title(f"top-r energy: {100 * stats['energy_captured']:.1f} % at r = {k}")
    fig.tight_layout()
    return fig


def rank_explorer(delta, r: int = 8, max_rank: int | None = None, title: str = "ΔW"):
    """A slider "rank r" over a ΔW showing error, energy, LoRA parameters and the spectrum.

    The HTML widget with CSS class ``course-rank-stats`` always shows
    ``format_rank_stats(rank_stats(delta, slider.value))``. The returned VBox carries ``slider``,
    ``stats_html``, ``plot`` (an Output) and ``stats`` (the dict currently shown).
    """

    rank_stats(delta, r)  # fails early, with the helpful message, on a bad r or a zero delta
    sigmas = singular_values(delta)
    full_rank = len(sigmas)
    if max_rank is None:
        max_rank = max(r, min(64, full_rank))
    max_rank = _lora_check_limit(max_rank, "max_rank", full_rank)
    if r > max_rank:
        raise ValueError(f"r={r} is above max_rank={max_rank}; pass a larger max_rank.")
    sigmas_list, curve = sigmas.tolist(), energy_curve(sigmas).tolist()

    slider = widgets.IntSlider(value=r, min=1, max=max_rank, step=1, description="rank r")
    stats_html = widgets.HTML()
    stats_html.add_class(RANK_STATS_CLASS)
    plot = widgets.Output()
    box = widgets.VBox([slider, stats_html, plot])

    def update(change: object = None) -> None:
        """Recompute and redraw from the slider's current value."""
        stats = rank_stats(delta, slider.value)
        box.stats = stats
        line = format_rank_stats(stats)
        stats_html.value = html.escape(line)
        _lora_show(plot, _rank_figure(sigmas_list, curve, stats, title), line)

    slider.observe(update, names="value")
    box.slider, box.stats_html, box.plot = slider, stats_html, plot
    update()
    return box


def _update_norm(r: int, alpha: float, rslora: bool) -> float:
    """first_step_update_norm, remembered: the explorer asks for the same points again and again."""
    key = (int(r), float(alpha), bool(rslora))
    if key not in _UPDATE_NORMS:
        _UPDATE_NORMS[key] = first_step_update_norm(r, alpha, rslora)
    return _UPDATE_NORMS[key]


def alpha_stats(r: int, alpha: float, rslora: bool = False) -> dict:
    """Exactly the numbers the alpha explorer shows: effective scale and first-step update norm.

    ``scale`` is alpha / r, or alpha / sqrt(r) with rsLoRA; ``update_norm`` is ||ΔW||_F / lr after
    one Adam step from the standard init (B = 0) on a 576 x 576 layer
    (see :func:`course_utils.lora.first_step_update_norm`).
    """
    if isinstance(r, bool) or not isinstance(r, int):
        raise TypeError(f"r must be an integer (got {r!r}); try r=8.")
    if not 1 <= r <= ALPHA_MAX_RANK:
        raise ValueError(
            f"r must be between 1 and {ALPHA_MAX_RANK}, SmolLM2's hidden size (got {r}); try r=8."
        )
    if not isinstance(rslora, bool):
        raise TypeError(f"rslora must be True or False (got {rslora!r}).")
    scale = lora_scaling(r, alpha, rslora)  # checks alpha > 0 with a helpful message
    return {
        "r": r,
        "alpha": alpha,
        "rslora": rslora,
        "rule": "α/√r" if rslora else "α/r",
        "scale": scale,
        "update_norm": _update_norm(r, alpha, rslora),
    }


def format_alpha_stats(stats: dict) -> str:
    """The alpha explorer's line: ``rank r = 8 · alpha α = 16 · rule = α/r · ...``."""
    _lora_check_stats(stats, ("r", "alpha", "rule", "scale", "update_norm"), "alpha_stats")
    return (
        f"rank r = {stats['r']} · alpha α = {stats['alpha']:g} · rule = {stats['rule']} · "
        f"effective scale = {stats['scale']:.4f} · update norm = {stats['update_norm']:.4f} × lr"
    )


def _alpha_figure(stats: dict, ranks: list[int]):
    """Effective scale and first-step update norm against r, for both rules, at the current α."""
    a, k = stats["alpha"], stats["r"]
    fig = Figure(figsize=(10, 3.4))
    left, right = fig.subplots(1, 2)
    for rslora, label, color in ((False, "α/r (LoRA)", "C0"), (True, "α/√r (rsLoRA)", "C1")):
        points = [alpha_stats(q, a, rslora) for q in ranks]
        left.loglog(ranks, [p["scale"] for p in points], "o-", ms=3, color=color, label=label)
        right.loglog(
            ranks, [p["update_norm"] for p in points], "o-", ms=3, color=color, label=label
        )
    left.plot([k], [stats["scale"]], "*", ms=14, color="C3", label="you are here")
    right.plot([k], [stats["update_norm"]], "*", ms=14, color="C3", label="you are here")
    left.set(xlabel="rank r", ylabel="effective scale", title=f"scale at α = {a:g}")
    right.set(xlabel="rank r", ylabel="||ΔW||_F / lr", title="update after one Adam step")
    left.legend(fontsize=8)
    right.legend(fontsize=8)
    fig.tight_layout()
    return fig


def alpha_explorer(
    r: int = 8, alpha: int = 16, rslora: bool = False, max_rank: int = 128, max_alpha: int = 128
):
    """Sliders "rank r" and "alpha α" and a checkbox "rsLoRA": effective scale and update norm.

    The HTML widget with CSS class ``course-alpha-stats`` always shows
    ``format_alpha_stats(alpha_stats(r, alpha, rslora))`` for the current values. The returned
    VBox carries ``controls`` ({"r", "alpha", "rslora"}), ``stats_html``, ``plot`` (an Output)
    and ``stats`` (the dict currently shown).
    """

    max_rank = _lora_check_limit(max_rank, "max_rank", ALPHA_MAX_RANK)
    max_alpha = _lora_check_limit(max_alpha, "max_alpha", 4096)
    alpha_stats(r, alpha, rslora)  # fails early, with the helpful message, on bad values
    if isinstance(alpha, bool) or not isinstance(alpha, int):
        raise TypeError(f"alpha must be an integer for the slider (got {alpha!r}); try alpha=16.")
    if r > max_rank or alpha > max_alpha:
        raise ValueError(
            f"r={r} and alpha={alpha} must not exceed max_rank={max_rank} and "
            f"max_alpha={max_alpha}; raise those limits."
        )
    controls = {
        "r": widgets.IntSlider(value=r, min=1, max=max_rank, description="rank r"),
        "alpha": widgets.IntSlider(value=alpha, min=1, max=max_alpha, description="alpha α"),
        "rslora": widgets.Checkbox(value=rslora, description="rsLoRA"),
    }
    stats_html = widgets.HTML()
    stats_html.add_class(ALPHA_STATS_CLASS)
    plot = widgets.Output()
    box = widgets.VBox([*controls.values(), stats_html, plot])
    grid = [2**i for i in range(max_rank.bit_length()) if 2**i <= max_rank]

    def update(change: object = None) -> None:
        """Recompute and redraw from the controls' current values."""
        stats = alpha_stats(**{name: control.value for name, control in controls.items()})
        box.stats = stats
        line = format_alpha_stats(stats)
        stats_html.value = html.escape(line)
        _lora_show(plot, _alpha_figure(stats, sorted(set(grid) | {stats["r"]})), line)

    for control in controls.values():
        control.observe(update, names="value")
    box.controls, box.stats_html, box.plot = controls, stats_html, plot
    update()
    return box


# ---------------------------------------------------------------------------------------------
# Memory calculator (lesson 03)
# ---------------------------------------------------------------------------------------------
#
# memory_stats(model, method, dtype, batch, seq_len, optimizer, n_devices, stage) -> dict
#                            memory.estimate in GB + the GPUs it fits; with n_devices > 1 also
#                            sharding.estimate_per_device per device and the fewest GPUs needed
# format_memory_stats(stats) -> str   the one line the calculator shows (CSS course-memory-stats)
# format_memory_precision(stats) -> str   the bytes per parameter of the setting, part by part
#                                         (CSS course-memory-precision)
# memory_calculator(...)     -> VBox  model/method/dtype/optimizer, sliders "batch" and "seq len",
#                                     dropdowns "devices" and "stage" (lesson 09), those two
#                                     lines, a breakdown bar chart and a GPU table

#: CSS class of the HTML widget that shows :func:`format_memory_stats` text (browser tests read it).
MEMORY_STATS_CLASS = "course-memory-stats"
#: CSS class of the HTML table saying which GPUs the setting fits on.
MEMORY_GPUS_CLASS = "course-memory-gpus"
#: CSS class of the HTML widget that shows :func:`format_memory_precision` text.
MEMORY_PRECISION_CLASS = "course-memory-precision"
#: CSS classes of the number-of-devices and stage dropdowns (lesson 09: N × GPU).
MEMORY_DEVICES_CLASS = "course-memory-devices"
MEMORY_STAGE_CLASS = "course-memory-stage"
#: The device counts the calculator offers; with 1 it shows one GPU, as in lesson 03.
MEMORY_DEVICES = (1, 2, 4, 8, 16, 32, 64)
#: The stages it offers: sharding.STAGES but hybrid sharding, which also needs a node size.
MEMORY_STAGES = tuple(name for name in sharding.STAGES if name != "fsdp_hybrid_shard")
#: Where the "fewest GPUs" column stops counting.
MEMORY_MAX_DEVICES = 1024
#: What the calculator's dtype choice means, as its dropdown says (lesson 01 measures each recipe).
#: A 16-bit dtype is mixed precision: for full fine-tuning, 16-bit weights and gradients plus an
#: fp32 master copy of the weights (``memory.estimate(..., master_weights=True)``); LoRA and QLoRA
#: freeze the base model in that dtype and train fp32 adapters, their own master copy. "fp32" is
#: also what torch AMP (autocast) on an fp32 model keeps: autocast changes the dtype of the
#: matmuls and of the activations they save, not of the weights, gradients or optimizer states.
MEMORY_DTYPES = {
    "fp32": "fp32 (what torch AMP on an fp32 model keeps too)",
    "bf16": "bf16 + fp32 master copy (mixed precision)",
    "fp16": "fp16 + fp32 master copy (mixed precision)",
}
#: The dtype the calculator keeps LoRA/QLoRA adapters in (PEFT's default; memory.estimate's too).
MEMORY_ADAPTER_DTYPE = "fp32"
#: The parts of training memory, in the order they are displayed.
MEMORY_PARTS = ("weights", "gradients", "optimizer", "activations")
_MEMORY_COLORS = {
    "weights": "#4C72B0",
    "gradients": "#DD8452",
    "optimizer": "#C44E52",
    "activations": "#55A868",
    "gathered": "#8172B3",
}


def memory_stats(
    model: str = "SmolLM2-135M",
    method: str = "full",
    dtype: str = "fp32",
    batch: int = 4,
    seq_len: int = 512,
    optimizer: str = "adamw",
    n_devices: int = 1,
    stage: str = "ddp",
) -> dict:
    """Exactly the numbers the memory calculator displays: ``memory.estimate`` in GB + the GPUs it fits.

    ``dtype`` "bf16" or "fp16" means mixed precision (see MEMORY_DTYPES): full fine-tuning keeps
    an fp32 master copy of the weights, ``master_weights=True``, so fp32 and both 16-bit dtypes
    cost the same 16 bytes per parameter with AdamW. Returns a dict with the settings,
    ``master_weights``, ``adapter_dtype``, ``n_params``, ``trainable_params``, ``<part>_bytes``
    and ``<part>_gb`` for weights, gradients, optimizer, activations and total (GB = GiB, as in
    :mod:`course_utils.memory`), ``gpus`` ({name: fits?}, smallest card first) and ``fits``
    (the names that fit, same order).

    With ``n_devices`` > 1 the run is spread over that many GPUs under ``stage`` (a name in
    MEMORY_STAGES): ``device_<part>_bytes``/``_gb`` are :func:`course_utils.sharding.estimate_per_device`
    for weights, gradients, optimizer, activations, gathered, total and host; ``gpus`` and
    ``fits`` then say whether it fits on ``n_devices`` × each GPU; ``devices_needed`` gives each
    GPU's fewest count under the stage (None: more than MEMORY_MAX_DEVICES). With one device the
    stage changes nothing: there is nothing to shard.
    """
    model = one_of(model, "model", list(memory.PRESETS))
    method = one_of(method, "method", memory.METHODS)
    dtype = one_of(dtype, "dtype", list(memory.BYTES_PER_DTYPE))
    optimizer = one_of(optimizer, "optimizer", list(memory.OPTIMIZER_BYTES_PER_PARAM))
    batch = positive_int(batch, "batch", "batch=4")
    seq_len = positive_int(seq_len, "seq_len", "seq_len=4")
    n_devices = positive_int(n_devices, "n_devices", "n_devices=8")
    stage = one_of(sharding.normalise_stage(stage), "stage", MEMORY_STAGES)
    setting = {  # memory.estimate's settings, the same for one device and for N
        "dtype": dtype,
        "batch": batch,
        "seq_len": seq_len,
        "optimizer": optimizer,
        "master_weights": method == "full" and dtype != "fp32",
        "adapter_dtype": MEMORY_ADAPTER_DTYPE,
    }
    est = memory.estimate(model, method, **setting)
    stats: dict = {
        "model": model,
        "method": method,
        **setting,
        "n_params": est.n_params,
        "trainable_params": est.trainable_params,
        "n_devices": n_devices,
        "stage": stage,
    }
    for part, value in est.breakdown().items():
        stats[f"{part}_bytes"] = value
        stats[f"{part}_gb"] = value / memory.GB
    gpus = sorted(memory.GPUS, key=lambda name: memory.GPUS[name])
    stats["gpus"] = {name: memory.fits(est, name) for name in gpus}
    if n_devices > 1:
        sharded = sharding.estimate_per_device(model, method, n_devices, stage, **setting)
        for part, value in sharded.breakdown().items():
            stats[f"device_{part}_bytes"] = value
            stats[f"device_{part}_gb"] = value / memory.GB
        stats["gpus"] = {name: memory.fits(sharded.total, name) for name in gpus}
        stats["devices_needed"] = {
            name: sharding.devices_needed(
                model, method, name, stage, max_devices=MEMORY_MAX_DEVICES, **setting
            )
            for name in gpus
        }
    stats["fits"] = [name for name in gpus if stats["gpus"][name]]
    return stats


def _memory_shown(stats: dict) -> dict[str, float]:
    """The GB the calculator shows, part by part and the total: per device when N > 1."""
    if stats.get("n_devices", 1) == 1:
        return {part: stats[f"{part}_gb"] for part in (*MEMORY_PARTS, "total")}
    names = [*MEMORY_PARTS, "total"]
    if sharding.STAGES[stats["stage"]]["shards"][2]:  # weights sharded: one unit gathered whole
        names.insert(-1, "gathered")
    return {part: stats[f"device_{part}_gb"] for part in names}


def format_memory_stats(stats: dict) -> str:
    """The one line of text the calculator shows, e.g. ``weights 0.50 GB · ... · fits: T4 16 GB``."""
    if not isinstance(stats, dict):
        raise TypeError(
            f"stats must be the dict memory_stats() returns, got {type(stats).__name__}."
        )
    n = stats.get("n_devices", 1)
    prefix = "" if n == 1 else "device_"
    keys = [f"{prefix}{part}_gb" for part in (*MEMORY_PARTS, "total")] + ["fits"]
    keys += [] if n == 1 else ["stage", "device_gathered_gb"]
    missing = [key for key in keys if key not in stats]
    if missing:
        raise ValueError(f"stats lacks {missing}; pass the dict memory_stats() returns.")
    parts = [f"{part} {gb:.2f} GB" for part, gb in _memory_shown(stats).items()]
    if n == 1:
        fits = ", ".join(stats["fits"]) if stats["fits"] else "none"
        return " · ".join(parts) + f" · fits: {fits}"
    fits = ", ".join(f"{n} × {name}" for name in stats["fits"]) if stats["fits"] else "none"
    return f"per device, {stats['stage']} on {n} devices: " + " · ".join(parts) + f" · fits: {fits}"


def format_memory_precision(stats: dict) -> str:
    """The bytes per parameter of a setting, part by part, e.g. for full fine-tuning in bf16:
    ``full fine-tuning, bf16 mixed precision, per parameter: 2 B bf16 weight + 2 B bf16 gradient
    + 4 B fp32 master copy + 8 B adamw states = 16 B (activations come on top)``."""
    _lora_check_stats(
        stats,
        (
            "method",
            "dtype",
            "optimizer",
            "master_weights",
            "adapter_dtype",
            "n_params",
            "trainable_params",
            "weights_bytes",
            "gradients_bytes",
            "optimizer_bytes",
        ),
        "memory_stats",
    )
    dtype, optimizer = stats["dtype"], stats["optimizer"]
    if stats["method"] == "full":
        n = stats["n_params"]
        master = memory.BYTES_PER_DTYPE["fp32"] if stats["master_weights"] else 0
        parts = [
            (stats["weights_bytes"] / n, f"{dtype} weight"),
            (stats["gradients_bytes"] / n, f"{dtype} gradient"),
        ]
        if master:
            parts.append((master, "fp32 master copy"))
        parts.append((stats["optimizer_bytes"] / n - master, f"{optimizer} states"))
        recipe = f"{dtype} mixed precision" if master else dtype
        terms = " + ".join(f"{value:.4g} B {name}" for value, name in parts)
        total = sum(value for value, _ in parts)
        return (
            f"full fine-tuning, {recipe}, per parameter: {terms} = {total:.4g} B "
            "(activations come on top)"
        )
    trainable, adapter = stats["trainable_params"], stats["adapter_dtype"]
    per_adapter = memory.BYTES_PER_DTYPE[adapter]
    states = stats["optimizer_bytes"] / trainable
    frozen = (stats["weights_bytes"] - trainable * per_adapter) / stats["n_params"]
    qlora = stats["method"] == "qlora"
    base = f"{dtype}, linear layers in NF4" if qlora else dtype
    return (
        f"{stats['method']}: per trainable adapter parameter ({trainable:,}, {adapter}): "
        f"{per_adapter:g} B weight + {per_adapter:g} B gradient + {states:.4g} B {optimizer} "
        f"states = {2 * per_adapter + states:.4g} B; frozen base model ({base}): "
        f"{frozen:.3g} B per weight{' on average' if qlora else ''}, no gradient, "
        "no optimizer state"
    )


def _memory_gpu_table(stats: dict) -> str:
    """An HTML table: each GPU, its memory, whether the setting fits and how full it would be."""

    if stats.get("n_devices", 1) > 1:
        return _memory_devices_table(stats)
    rows = []
    for name, ok in stats["gpus"].items():
        usage = stats["total_bytes"] / (memory.GPUS[name] * memory.GB)
        mark = "✓ fits" if ok else "✗ too small"
        rows.append(
            f"<tr><td>{html.escape(name)}</td><td>{memory.GPUS[name]:g} GB</td>"
            f"<td>{mark}</td><td>{usage:.0%}</td></tr>"
        )
    head = "<tr><th>GPU</th><th>memory</th><th>this setting</th><th>used</th></tr>"
    note = "fits = total ≤ 90 % of the card (the rest goes to the CUDA context and allocator)"
    return f"<table>{head}{''.join(rows)}</table><small>{note}</small>"


def _memory_devices_table(stats: dict) -> str:
    """The GPU table for N devices: fits on N × GPU, per-device use, fewest GPUs under the stage."""

    n, stage = stats["n_devices"], stats["stage"]
    rows = []
    for name, ok in stats["gpus"].items():
        usage = stats["device_total_bytes"] / (memory.GPUS[name] * memory.GB)
        needed = stats["devices_needed"][name]
        fewest = f"more than {MEMORY_MAX_DEVICES}" if needed is None else str(needed)
        mark = "✓ fits" if ok else "✗ too small"
        rows.append(
            f"<tr><td>{html.escape(name)}</td><td>{memory.GPUS[name]:g} GB</td>"
            f"<td>{mark}</td><td>{usage:.0%}</td><td>{fewest}</td></tr>"
        )
    head = (
        f"<tr><th>GPU</th><th>memory</th><th>on {n} × GPU ({html.escape(stage)})</th>"
        f"<th>used per GPU</th><th>fewest GPUs under {html.escape(stage)}</th></tr>"
    )
    note = (
        f"per GPU: {stats['device_total_gb']:.2f} GB (sharding.estimate_per_device); fits = that "
        "total ≤ 90 % of the card; batch is each GPU's micro-batch, its activations not sharded"
    )
    return f"<table>{head}{''.join(rows)}</table><small>{html.escape(note)}</small>"


def _memory_chart_png(stats: dict) -> bytes:
    """A horizontal bar per memory part plus the total, with the GPU sizes as dashed lines (PNG)."""

    shown = _memory_shown(stats)
    names, values = list(shown), list(shown.values())
    fig = Figure(figsize=(7, 2.6))
    ax = fig.subplots()
    colors = [_MEMORY_COLORS.get(name, "#555555") for name in names]
    bars = ax.barh(names[::-1], values[::-1], color=colors[::-1])
    ax.bar_label(bars, labels=[f"{v:.2f} GB" for v in values[::-1]], padding=3, fontsize=8)
    top = max(values) * 1.25 or 1.0
    for name, size in memory.GPUS.items():
        if top * 0.04 <= size <= top:  # lines far left of the bars would only be clutter
            ax.axvline(size, color="grey", linestyle="--", linewidth=0.8)
            ax.text(size, len(names) - 0.55, name, rotation=90, fontsize=7, va="top", ha="right")
    ax.set_xlim(0, top)
    n = stats.get("n_devices", 1)
    ax.set_xlabel("GB" if n == 1 else f"GB per device ({stats['stage']} on {n} devices)")
    ax.set_title(
        f"{stats['model']} · {stats['method']} · {stats['dtype']}"
        f"{' + fp32 master' if stats.get('master_weights') else ''} · {stats['optimizer']} · "
        f"batch {stats['batch']} × {stats['seq_len']} tokens",
        fontsize=9,
    )
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=80)
    return buffer.getvalue()


def memory_calculator(
    model: str = "SmolLM2-135M",
    method: str = "full",
    dtype: str = "fp32",
    batch: int = 4,
    seq_len: int = 512,
    optimizer: str = "adamw",
    n_devices: int = 1,
    stage: str = "ddp",
):
    """An ipywidgets memory calculator over :func:`memory_stats`; returns the widget to display.

    The text in the HTML widget with CSS class ``course-memory-stats`` is always
    ``format_memory_stats(memory_stats(...current values...))``; the one with class
    ``course-memory-precision`` shows ``format_memory_precision`` of the same dict. The dtype
    dropdown shows MEMORY_DTYPES' labels for the values "fp32", "bf16" and "fp16". The returned
    VBox carries ``controls`` (dict of the input widgets by argument name), ``stats_html``,
    ``precision_html``, ``gpu_table``, ``chart`` (an Output) and ``stats`` (the dict shown).
    Dropdowns "devices" (MEMORY_DEVICES, CSS class ``course-memory-devices``) and "stage"
    (MEMORY_STAGES, ``course-memory-stage``) are in ``sharding_controls``: with more than one
    device the text, chart and table are per device, and the table gains the fewest GPUs.
    """

    memory_stats(model, method, dtype, batch, seq_len, optimizer, n_devices, stage)  # validate
    one_of(n_devices, "n_devices", MEMORY_DEVICES)
    stage = sharding.normalise_stage(stage)
    wide = {"description_width": "80px"}
    controls = {
        "model": widgets.Dropdown(
            options=list(memory.PRESETS), value=model, description="model", style=wide
        ),
        "method": widgets.ToggleButtons(
            options=list(memory.METHODS), value=method, description="method", style=wide
        ),
        "dtype": widgets.Dropdown(
            options=[(MEMORY_DTYPES[name], name) for name in memory.BYTES_PER_DTYPE],
            value=dtype,
            description="dtype",
            style=wide,
            layout=widgets.Layout(width="440px"),
        ),
        "optimizer": widgets.Dropdown(
            options=list(memory.OPTIMIZER_BYTES_PER_PARAM),
            value=optimizer,
            description="optimizer",
            style=wide,
        ),
        "batch": widgets.IntSlider(
            value=batch, min=1, max=max(64, batch), step=1, description="batch", style=wide
        ),
        "seq_len": widgets.IntSlider(
            value=seq_len,
            min=min(64, seq_len),
            max=max(8192, seq_len),
            step=64,
            description="seq len",
            style=wide,
        ),
    }
    sharding_controls = {
        "n_devices": widgets.Dropdown(
            options=list(MEMORY_DEVICES), value=n_devices, description="devices", style=wide
        ),
        "stage": widgets.Dropdown(
            options=list(MEMORY_STAGES), value=stage, description="stage", style=wide
        ),
    }
    sharding_controls["n_devices"].add_class(MEMORY_DEVICES_CLASS)
    sharding_controls["stage"].add_class(MEMORY_STAGE_CLASS)
    stats_html = widgets.HTML()
    stats_html.add_class(MEMORY_STATS_CLASS)
    precision_html = widgets.HTML()
    precision_html.add_class(MEMORY_PRECISION_CLASS)
    gpu_table = widgets.HTML()
    gpu_table.add_class(MEMORY_GPUS_CLASS)
    chart = widgets.Output()
    inputs = {**controls, **sharding_controls}
    box = widgets.VBox([*inputs.values(), stats_html, precision_html, chart, gpu_table])

    def update(change: object = None) -> None:
        """Recompute and redraw everything from the controls' current values."""
        stats = memory_stats(**{name: control.value for name, control in inputs.items()})
        box.stats = stats
        stats_html.value = html.escape(format_memory_stats(stats))
        precision_html.value = html.escape(format_memory_precision(stats))
        gpu_table.value = _memory_gpu_table(stats)
        png = base64.b64encode(_memory_chart_png(stats)).decode("ascii")
        chart.outputs = (
            {
                "output_type": "display_data",
                "data": {"image/png": png, "text/plain": format_memory_stats(stats)},
                "metadata": {},
            },
        )

    for control in inputs.values():
        control.observe(update, names="value")
    box.controls = controls
    box.sharding_controls = sharding_controls
    box.stats_html = stats_html
    box.precision_html = precision_html
    box.gpu_table = gpu_table
    box.chart = chart
    update()
    return box
