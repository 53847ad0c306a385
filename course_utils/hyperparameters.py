"""The hyperparameter guide (lesson 08): the grid `make sweeps` runs, and what is read from it.

Every run of the grid is lab 05's LoRA run with one setting changed. A run is a plain dict whose
keys are the libraries' own field names, split between PEFT's ``LoraConfig`` (LORA_FIELDS) and
TRL's ``SFTConfig`` (SFT_FIELDS), so the config a learner reads is the config that ran.
`course_tools.sweeps` trains the runs and writes ``course_utils/data/sweeps.json``; this module
loads that file, draws each knob, and *generates* the recommendation table: for every knob the
value that did best on our task, how much the knob moved the score next to the seed's own
spread, and whether that agrees with the advice most guides give (cited, not measured here).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from course_utils.checks import one_of

__all__ = [
    "ATTENTION",
    "BASES",
    "KNOBS",
    "LORA_FIELDS",
    "MLP",
    "SFT_FIELDS",
    "SWEEPS_FILE",
    "Knob",
    "all_runs",
    "check_results",
    "knob",
    "load",
    "lora_kwargs",
    "metric",
    "plot_knob",
    "recommendation_rows",
    "recommendation_table",
    "run_id",
    "runs_of",
    "seed_spread",
    "sft_kwargs",
    "variant_config",
]

SWEEPS_FILE = Path(__file__).parent / "data" / "sweeps.json"
ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]
MLP = ["gate_proj", "up_proj", "down_proj"]
#: The fields of a run that go to PEFT's LoraConfig, and those that go to TRL's SFTConfig.
LORA_FIELDS = ("r", "lora_alpha", "use_rslora", "lora_dropout", "target_modules")
SFT_FIELDS = (
    "learning_rate",
    "lr_scheduler_type",
    "warmup_steps",
    "weight_decay",
    "per_device_train_batch_size",
    "gradient_accumulation_steps",
    "max_steps",
    "seed",
)
#: The centre of every row: lab 05's run (r = 16, α = 32, all linear layers, lr 1e-3, linear
#: schedule, batch 8) at 16 steps instead of 28, so that the 40-odd runs fit in about an hour.
#: "python" is the same LoRA on the causal-LM task (blocks of 128 tokens of the Python reference).
_LAB05 = {
    "r": 16,
    "lora_alpha": 32,
    "use_rslora": False,
    "lora_dropout": 0.0,
    "target_modules": "all-linear",
    "learning_rate": 1e-3,
    "lr_scheduler_type": "linear",
    "warmup_steps": 0.0,
    "weight_decay": 0.0,
    "per_device_train_batch_size": 8,
    "gradient_accumulation_steps": 1,
    "max_steps": 16,
    "seed": 0,
}
BASES: dict[str, dict[str, Any]] = {
    "rentals": {"task": "rentals", **_LAB05},
    "python": {"task": "python", **_LAB05},
}
TASKS = tuple(BASES)
#: What each task's runs are scored by, and which way is better.
METRICS = {"rentals": ("exact_match", "higher"), "python": ("perplexity", "lower")}


@dataclass(frozen=True)
class Knob:
    """One row of the recommendation table: the values tried, and what guides advise."""

    name: str
    task: str
    variants: tuple[tuple[str, dict[str, Any]], ...]  # (label, changes to the task's base run)
    advice: str  # what the usual guides say, in a few words
    advised: tuple[str, ...]  # the labels of the variants the advice points at
    sources: str  # where the advice comes from (papers, documentation)


def _base_label(value: object) -> tuple[str, dict]:
    """The base run's variant in a row: its value, marked as lab 05's."""
    return (f"{value} (lab 05)", {})


KNOBS: tuple[Knob, ...] = (
    Knob(
        "rank r (α = 2r)",
        "rentals",
        (
            ("4", {"r": 4, "lora_alpha": 8}),
            ("8", {"r": 8, "lora_alpha": 16}),
            _base_label(16),
            ("64", {"r": 64, "lora_alpha": 128}),
        ),
        "r = 8 to 16 to start; higher only with more data",
        ("8", "16 (lab 05)"),
        "Hu et al. 2021 (LoRA) §7.2; Unsloth's LoRA hyperparameters guide",
    ),
    Knob(
        "α and its scaling (r = 16)",
        "rentals",
        (
            ("α = r (scale 1)", {"lora_alpha": 16}),
            _base_label("α = 2r (scale 2)"),
            ("rsLoRA α = 32 (scale 8)", {"use_rslora": True}),
        ),
        "α = 2r (or α = r); rsLoRA's α/√r for high ranks",
        ("α = 2r (scale 2) (lab 05)",),
        "Unsloth's LoRA hyperparameters guide; Kalajdzievski 2023 (rsLoRA)",
    ),
    Knob(
        "learning rate",
        "rentals",
        (
            ("1e-4", {"learning_rate": 1e-4}),
            ("2e-4", {"learning_rate": 2e-4}),
            _base_label("1e-3"),
            ("3e-3", {"learning_rate": 3e-3}),
            ("1e-2", {"learning_rate": 1e-2}),
        ),
        "2e-4 for LoRA and QLoRA",
        ("2e-4",),
        "Dettmers et al. 2023 (QLoRA) Appendix B; Unsloth's LoRA hyperparameters guide",
    ),
    Knob(
        "LoRA dropout",
        "rentals",
        (_base_label(0.0), ("0.05", {"lora_dropout": 0.05}), ("0.1", {"lora_dropout": 0.1})),
        "0.05 to 0.1",
        ("0.05", "0.1"),
        "Dettmers et al. 2023 (QLoRA): 0.1 up to 13B, 0.05 above",
    ),
    Knob(
        "weight decay",
        "rentals",
        (_base_label(0.0), ("0.01", {"weight_decay": 0.01}), ("0.1", {"weight_decay": 0.1})),
        "0.01 (small or none)",
        ("0.01",),
        "Unsloth's LoRA hyperparameters guide; QLoRA used 0",
    ),
    Knob(
        "warm-up (share of the steps)",
        "rentals",
        (_base_label("0 %"), ("5 %", {"warmup_steps": 0.05}), ("10 %", {"warmup_steps": 0.1})),
        "a few % of the steps (QLoRA: 3 %)",
        ("5 %",),
        "Dettmers et al. 2023 (QLoRA) Appendix B; transformers 5's warmup_steps (a float under 1 is a share of the steps)",
    ),
    Knob(
        "learning-rate schedule",
        "rentals",
        (
            ("constant", {"lr_scheduler_type": "constant"}),
            _base_label("linear"),
            ("cosine", {"lr_scheduler_type": "cosine"}),
        ),
        "cosine (QLoRA used constant; transformers' default is linear)",
        ("cosine",),
        "Dettmers et al. 2023 (QLoRA); transformers' TrainingArguments",
    ),
    Knob(
        "target modules",
        "rentals",
        (
            ("attention (q, k, v, o)", {"target_modules": ATTENTION}),
            ("MLP (gate, up, down)", {"target_modules": MLP}),
            _base_label("all-linear"),
        ),
        "all linear layers",
        ("all-linear (lab 05)",),
        "Dettmers et al. 2023 (QLoRA) §4; PEFT's target_modules='all-linear'",
    ),
    Knob(
        "effective batch (same 128 examples)",
        "rentals",
        (
            ("4 × 1, 32 steps", {"per_device_train_batch_size": 4, "max_steps": 32}),
            _base_label("8 × 1, 16 steps"),
            ("8 × 2, 8 steps", {"gradient_accumulation_steps": 2, "max_steps": 8}),
            ("8 × 4, 4 steps", {"gradient_accumulation_steps": 4, "max_steps": 4}),
        ),
        "an effective batch of 16 (QLoRA); small batches with accumulation on small GPUs",
        ("8 × 2, 8 steps",),
        "Dettmers et al. 2023 (QLoRA) Appendix B; Unsloth's LoRA hyperparameters guide",
    ),
    Knob(
        "steps (50 steps of 8 = one epoch)",
        "rentals",
        (
            ("8", {"max_steps": 8}),
            _base_label(16),
            ("32", {"max_steps": 32}),
            ("64", {"max_steps": 64}),
        ),
        "1 to 3 epochs",
        ("64",),
        "Unsloth's LoRA hyperparameters guide; Dettmers et al. 2023 (QLoRA)",
    ),
    Knob(
        "seed",
        "rentals",
        (_base_label(0), *((str(s), {"seed": s}) for s in range(1, 4))),
        "report more than one seed",
        (),
        "Dodge et al. 2020 (fine-tuning and random seeds)",
    ),
    Knob(
        "learning rate, causal LM",
        "python",
        (
            ("1e-4", {"learning_rate": 1e-4}),
            _base_label("1e-3"),
            ("3e-3", {"learning_rate": 3e-3}),
        ),
        "2e-4 for LoRA",
        (),
        "Dettmers et al. 2023 (QLoRA) Appendix B",
    ),
    Knob(
        "rank r, causal LM (α = 2r)",
        "python",
        (
            ("4", {"r": 4, "lora_alpha": 8}),
            _base_label(16),
            ("64", {"r": 64, "lora_alpha": 128}),
        ),
        "higher ranks for new knowledge",
        ("64",),
        "Biderman et al. 2024 (LoRA learns less and forgets less)",
    ),
    Knob(
        "target modules, causal LM",
        "python",
        (
            ("attention (q, k, v, o)", {"target_modules": ATTENTION}),
            ("MLP (gate, up, down)", {"target_modules": MLP}),
            _base_label("all-linear"),
        ),
        "all linear layers; the MLP matters most for new knowledge",
        ("all-linear (lab 05)",),
        "Dettmers et al. 2023 (QLoRA) §4; Biderman et al. 2024",
    ),
    Knob(
        "seed, causal LM",
        "python",
        (_base_label(0), ("1", {"seed": 1})),
        "report more than one seed",
        (),
        "Dodge et al. 2020",
    ),
)


def knob(name: str) -> Knob:
    """Return the knob called `name` (one of KNOBS' names)."""
    names = [k.name for k in KNOBS]
    return KNOBS[names.index(one_of(name, "knob", names))]


def variant_config(knob_: Knob, label: str) -> dict[str, Any]:
    """Return the whole run config of one variant of a knob: its task's base run, changed."""
    labels = [lab for lab, _ in knob_.variants]
    changes = dict(knob_.variants[labels.index(one_of(label, "variant", labels))][1])
    return {**BASES[knob_.task], **changes}


def run_id(config: dict[str, Any]) -> str:
    """Name a run by its task and what differs from that task's base run ("rentals" = the base)."""
    base = BASES[one_of(config.get("task"), "config['task']", TASKS)]
    unknown = set(config) - set(base)
    if unknown:
        raise ValueError(f"unknown run fields {sorted(unknown)}; use {sorted(base)}.")
    changed = [f"{k}={_short(config[k])}" for k in base if k in config and config[k] != base[k]]
    return ",".join([base["task"], *changed])


def _short(value: object) -> str:
    """A value as it appears in a run's name (lists by their first letters)."""
    if value == ATTENTION:
        return "attention"
    if value == MLP:
        return "mlp"
    return f"{value:g}" if isinstance(value, float) else str(value)


def all_runs() -> dict[str, dict[str, Any]]:
    """Every distinct run of the grid by its id, in the order the knobs list them."""
    runs = {}
    for k in KNOBS:
        for label, _ in k.variants:
            config = variant_config(k, label)
            runs.setdefault(run_id(config), config)
    return runs


def lora_kwargs(config: dict[str, Any]) -> dict[str, Any]:
    """The run's fields that PEFT's LoraConfig takes (lists copied)."""
    return {k: list(v) if isinstance(v, list) else v for k, v in config.items() if k in LORA_FIELDS}


def sft_kwargs(config: dict[str, Any]) -> dict[str, Any]:
    """The run's fields that TRL's SFTConfig takes."""
    return {k: v for k, v in config.items() if k in SFT_FIELDS}


# --------------------------------------------------------------------------------------------
# Reading the results.
# --------------------------------------------------------------------------------------------

#: What every results file holds (checked by `check_results`).
TOP_KEYS = ("provenance", "profile", "before", "runs")
PROVENANCE_KEYS = ("date", "machine", "versions", "command", "seconds")
RUN_KEYS = ("id", "config", "lora_config", "sft_config", "train", "metrics")


def load(path: str | Path | None = None) -> dict[str, Any]:
    """Load a sweeps results file (default: the one the course ships) and check its shape."""
    path = Path(path) if path is not None else SWEEPS_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist; run `make sweeps` to create it.")
    return check_results(json.loads(path.read_text()))


def check_results(results: object) -> dict[str, Any]:
    """Return `results` if it has every key a sweeps file needs, else raise naming the first gap."""
    if not isinstance(results, dict):
        raise ValueError("a sweeps file holds one JSON object; run `make sweeps` to write one.")
    _require(results, TOP_KEYS, "the results")
    _require(results["provenance"], PROVENANCE_KEYS, "provenance")
    for task in results["before"]:
        _require(results["before"][task], (METRICS[task][0],), f"before[{task!r}]")
    for rid, run in results["runs"].items():
        _require(run, RUN_KEYS, f"run {rid!r}")
        _require(run["metrics"], (METRICS[run["config"]["task"]][0],), f"run {rid!r} metrics")
        if run["id"] != rid or run_id(run["config"]) != rid:
            raise ValueError(f"run {rid!r} is stored under the wrong id; re-run `make sweeps`.")
    return results


def _require(mapping: object, keys: tuple[str, ...], where: str) -> None:
    """Raise if `mapping` is not a dict holding every key."""
    if not isinstance(mapping, dict):
        raise ValueError(f"{where} must be a JSON object; re-run `make sweeps`.")
    missing = [k for k in keys if k not in mapping]
    if missing:
        raise ValueError(f"{where} lacks {missing}; re-run `make sweeps`.")


def runs_of(results: dict[str, Any], knob_: Knob) -> list[tuple[str, dict[str, Any] | None]]:
    """The knob's variants with their runs from `results` (None where a run is missing)."""
    runs = results["runs"]
    return [(label, runs.get(run_id(variant_config(knob_, label)))) for label, _ in knob_.variants]


def metric(run: dict[str, Any]) -> float:
    """The score of a run on its task (exact match for rentals, perplexity for python)."""
    return run["metrics"][METRICS[run["config"]["task"]][0]]


def seed_spread(results: dict[str, Any], task: str = "rentals") -> float | None:
    """The largest minus the smallest score over the seeds of the base run (None: under two)."""
    scores = [metric(run) for _, run in runs_of(results, knob(_seed_knob(task))) if run is not None]
    return max(scores) - min(scores) if len(scores) > 1 else None


def _format(task: str, value: float) -> str:
    """A score as the table prints it."""
    return f"{value:.0%}" if METRICS[task][1] == "higher" else f"{value:.2f}"


def _best(task: str, scored: list[tuple[str, float]]) -> tuple[str, float]:
    """The variant with the best score (ties: the first listed)."""
    sign = 1 if METRICS[task][1] == "higher" else -1
    return max(scored, key=lambda pair: sign * pair[1])


def recommendation_rows(results: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per knob, computed from the runs: best value, effect, noise, advice, verdict."""
    rows = []
    for k in KNOBS:
        scored = [(label, metric(run)) for label, run in runs_of(results, k) if run is not None]
        if not scored:
            continue
        noise = seed_spread(results, k.task)
        best_label, best = _best(k.task, scored)
        effect = max(s for _, s in scored) - min(s for _, s in scored)
        rows.append(
            {
                "knob": k.name,
                "task": k.task,
                "scores": scored,
                "best": best_label,
                "effect": effect,
                "noise": noise,
                "verdict": _verdict(k, scored, best, noise),
                "advice": k.advice,
                "sources": k.sources,
                "runs": [run["id"] for _, run in runs_of(results, k) if run is not None],
            }
        )
    return rows


def _verdict(k: Knob, scored: list[tuple[str, float]], best: float, noise: float | None) -> str:
    """Whether our runs agree with the advice: one of its values within the seeds' spread of the best."""
    if k.name.startswith("seed"):
        return "the spread every other row is read against"
    if noise is None:
        return "seeds not run: no noise level to judge by"
    effect = max(s for _, s in scored) - min(s for _, s in scored)
    if effect <= noise:
        return "no effect beyond the seeds' spread"
    advised = [s for label, s in scored if label in k.advised]
    if not advised:
        return "no advised value in the grid"
    gap = min(abs(best - s) for s in advised)  # the advised value that came closest
    return "agrees" if gap <= noise else "disagrees"


def recommendation_table(results: dict[str, Any]) -> str:
    """The recommendation table as markdown, every row generated from the runs that back it."""
    lines = [
        "| knob | task | what each value scored | best here | moved by | seed spread "
        "| usual advice (source) | ours vs advice | runs |",
        "|---|---|---|---|---:|---:|---|---|---|",
    ]
    for row in recommendation_rows(results):
        task = row["task"]
        scores = ", ".join(f"{label}: {_format(task, s)}" for label, s in row["scores"])
        lines.append(
            f"| {row['knob']} | {task} | {scores} | {row['best']} "
            f"| {_points(task, row['effect'])} | {_points(task, row['noise'])} "
            f"| {row['advice']} ({row['sources']}) | {row['verdict']} "
            f"| {'; '.join(f'`{r}`' for r in row['runs'])} |"
        )
    return "\n".join(lines)


def _points(task: str, difference: float | None) -> str:
    """A difference of scores: points of exact match, or perplexity."""
    if difference is None:
        return "n/a"
    return f"{difference * 100:.0f} pts" if METRICS[task][1] == "higher" else f"{difference:.2f}"


def plot_knob(results: dict[str, Any], knob_: Knob, ax=None, mine: dict[str, Any] | None = None):
    """Draw one knob: each value's score (exact match with its 95 % interval, or perplexity).

    The band is the seeds' range of the base run; `mine` is a learner's own run of one variant,
    drawn as a star beside the shipped point ({"label": ..., "score": ...}).
    """
    import matplotlib.pyplot as plt  # lazy: only the plots need it

    if ax is None:
        _, ax = plt.subplots(figsize=(5, 3))
    task = knob_.task
    pairs = [(label, run) for label, run in runs_of(results, knob_) if run is not None]
    xs = range(len(pairs))
    scores = [metric(run) for _, run in pairs]
    if task == "rentals":
        low = [s - run["metrics"]["interval"][0] for s, (_, run) in zip(scores, pairs)]
        high = [run["metrics"]["interval"][1] - s for s, (_, run) in zip(scores, pairs)]
        ax.errorbar(xs, scores, yerr=[low, high], fmt="o", capsize=3, label="shipped runs")
    else:
        ax.plot(xs, scores, "o", label="shipped runs")
    seeds = [metric(run) for _, run in runs_of(results, knob(_seed_knob(task))) if run is not None]
    if seeds:
        ax.axhspan(min(seeds), max(seeds), color="grey", alpha=0.2, label="seeds' range")
    if mine is not None:
        labels = [label for label, _ in pairs]
        x = labels.index(one_of(mine["label"], "mine['label']", labels))
        ax.plot([x + 0.15], [mine["score"]], "*", markersize=14, color="C3", label="your run")
    ax.set_xticks(list(xs), [label for label, _ in pairs], rotation=25, ha="right", fontsize=8)
    ax.set_ylabel("exact match" if task == "rentals" else "held-out perplexity")
    ax.set_title(knob_.name, fontsize=10)
    ax.grid(alpha=0.3)
    return ax


def _seed_knob(task: str) -> str:
    """The name of the seed row of a task."""
    return "seed" if task == "rentals" else "seed, causal LM"
