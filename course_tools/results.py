"""``make results``: the three-domain table of full fine-tuning, LoRA and QLoRA.

Five methods (full fine-tuning; LoRA with (r, α) = (4, 16), (8, 32), (16, 32); QLoRA with
(16, 32) on the NF4 base) on the three tasks the course ships, each trained the same number of
steps of 8 examples with TRL's SFTTrainer (`course_tools.train`, the path `make bench` uses):

- classification: a standard-library docstring -> its documentation section (accuracy);
- causal LM: the Python language reference, blocks of 128 tokens (held-out perplexity);
- instruction following: rentals listing -> JSON (exact match).

Each row: trainable parameters, seconds per step and per 100 steps, peak training memory, the
metric before and after, and forgetting: how much worse the model got on something it was not
trained on (the chat tasks: perplexity of held-out Python reference text; the causal-LM task: the
loss on rentals answers), measured against the same base (the NF4 base for QLoRA). Written to
``course_utils/data/results.json`` and ``docs/results_table.md``.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path
from typing import Any

from course_tools import experiment, train
from course_utils import assets, data, env, evaluate

ROOT = Path(__file__).resolve().parent.parent
RESULTS_FILE = ROOT / "course_utils" / "data" / "results.json"
DOCS = ROOT / "docs" / "results_table.md"
BLOCK_SIZE = 128

#: The methods of the table: (r, α) and learning rate (full fine-tuning takes a smaller one).
METHODS: dict[str, dict[str, Any]] = {
    "full": {"method": "full", "learning_rate": 5e-5},
    "LoRA r=4 α=16": {"method": "lora", "r": 4, "alpha": 16, "learning_rate": 1e-3},
    "LoRA r=8 α=32": {"method": "lora", "r": 8, "alpha": 32, "learning_rate": 1e-3},
    "LoRA r=16 α=32": {"method": "lora", "r": 16, "alpha": 32, "learning_rate": 1e-3},
    "QLoRA r=16 α=32": {"method": "qlora", "r": 16, "alpha": 32, "learning_rate": 1e-3},
}
#: The tasks: the metric, which way is better, and what forgetting is measured on.
DOMAINS: dict[str, dict[str, str]] = {
    "classification": {
        "metric": "accuracy",
        "better": "higher",
        "probe": "perplexity of held-out Python reference text",
    },
    "causal_lm": {
        "metric": "perplexity",
        "better": "lower",
        "probe": "loss on rentals answers (validation)",
    },
    "instruction": {
        "metric": "exact_match",
        "better": "higher",
        "probe": "perplexity of held-out Python reference text",
    },
}
BATCH_SIZE = 8


def steps() -> int:
    """Optimizer steps of every run, by profile."""
    return env.by_profile(full=16, ci=2)


def sizes() -> dict[str, int]:
    """How much held-out data scores each run, by profile."""
    return {
        "test": env.by_profile(full=40, ci=4),
        "blocks": env.by_profile(full=32, ci=4),
        "probe_listings": env.by_profile(full=40, ci=4),
    }


class Bench:
    """What every run shares: tokenizer, training sets, held-out sets and the untrained scores."""

    def __init__(self) -> None:
        self.tokenizer = assets.load_tokenizer()
        n = sizes()
        self.train_sets = {
            "classification": data.load_classification_task("train"),
            "causal_lm": data.text_block_dataset(
                self.tokenizer, data.load_python_reference("train"), BLOCK_SIZE
            ),
            "instruction": data.load_instruction_task("train"),
        }
        self.tests = {
            "classification": data.load_classification_task("test")[: n["test"]],
            "instruction": data.load_instruction_task("test")[: n["test"]],
        }
        self.reference = data.load_python_reference("validation")
        self.listings = data.load_instruction_task("validation")[: n["probe_listings"]]
        self.untrained: dict[tuple[str, bool], dict[str, float]] = {}

    def metric(self, domain: str, model) -> float:
        """The task's held-out score of `model`."""
        if domain == "causal_lm":
            return self.perplexity(model)
        if domain == "classification":
            scored = data.evaluate_classification(model, self.tokenizer, self.tests[domain])
            return scored["accuracy"]
        return evaluate.score_instruction(model, self.tokenizer, self.tests[domain])["exact_match"]

    def perplexity(self, model) -> float:
        """Perplexity of held-out Python reference text."""
        blocks = sizes()["blocks"]
        return evaluate.perplexity(model, self.tokenizer, self.reference, max_blocks=blocks)

    def probe(self, domain: str, model) -> float:
        """What forgetting is measured on: something the run did not train on."""
        if domain == "causal_lm":
            return evaluate.answer_loss(model, self.tokenizer, self.listings)
        return self.perplexity(model)

    def before(self, domain: str, quantized: bool) -> dict[str, float]:
        """The untrained model's metric and probe (the fp32 base, or its NF4 copy), once each."""
        if (domain, quantized) not in self.untrained:
            model = self.load(quantized)
            scored = {"metric": self.metric(domain, model), "probe": self.probe(domain, model)}
            self.untrained[domain, quantized] = scored
            del model
            gc.collect()
        return self.untrained[domain, quantized]

    @staticmethod
    def load(quantized: bool):
        """The pretrained model (its NF4 copy for QLoRA), quietly."""
        return assets.load_model(quantization="nf4" if quantized else None, verbose=False)

    def run(self, domain: str, name: str) -> dict[str, Any]:
        """Train one method on one task and measure the table's columns."""
        spec = METHODS[name]
        quantized = spec["method"] == "qlora"
        before = self.before(domain, quantized)
        env.seed_everything(0)
        model = self.load(quantized)
        lora = train.lora_config(spec["r"], spec["alpha"]) if "r" in spec else None
        model = train.prepare_model(model, spec["method"], lora, gradient_checkpointing=False)
        result = train.train(
            model,
            self.tokenizer,
            self.train_sets[domain],
            method=spec["method"],
            steps=steps(),
            batch_size=BATCH_SIZE,
            learning_rate=spec["learning_rate"],
            live_plot=False,
            measure_memory=True,
            progress_bar=False,
        )
        after = {"metric": self.metric(domain, model), "probe": self.probe(domain, model)}
        del model
        gc.collect()
        return {
            "domain": domain,
            "method": name,
            "spec": spec,
            "steps": result.steps,
            "batch_size": BATCH_SIZE,
            "trainable_params": result.trainable_params,
            "seconds_per_step": round(result.seconds_per_step, 3),
            "peak_memory_bytes": result.peak_memory,
            "losses": [round(x, 5) for x in result.losses],
            "before": before,
            "after": after,
            "forgetting": after["probe"] / before["probe"] - 1,
        }


_SLOT: dict[str, Any] = {}


def _start(threads: int | None) -> None:
    """Prepare a process: quiet libraries, the shared data loaded once."""
    experiment.quiet()
    experiment.start_worker(Bench, threads, _SLOT)


def _run(job: tuple[str, str]) -> dict[str, Any]:
    """Train one (domain, method) in a prepared process."""
    return _SLOT["bench"].run(*job)


def jobs_of(only_domains: list[str] | None, only_methods: list[str] | None) -> list[tuple]:
    """The (domain, method) pairs to run, in the table's order."""
    domains = only_domains or list(DOMAINS)
    names = only_methods or list(METHODS)
    for value, known in ((domains, DOMAINS), (names, METHODS)):
        unknown = sorted(set(value) - set(known))
        if unknown:
            raise ValueError(f"unknown {unknown}; choose from {list(known)}.")
    return [(d, m) for d in domains for m in names]


def table(results: dict[str, Any]) -> str:
    """The results as one markdown table (no number typed by hand: all read from `results`)."""
    lines = [
        "| task | method | trainable params | s/step | min per 100 steps | peak training MB "
        "| metric: before → after | forgetting |",
        "|---|---|---:|---:|---:|---:|---|---:|",
    ]
    for row in results["rows"]:
        domain = DOMAINS[row["domain"]]
        fmt = "{:.0%}" if domain["better"] == "higher" else "{:.2f}"
        peak = row["peak_memory_bytes"]
        lines.append(
            f"| {row['domain']} | {row['method']} | {row['trainable_params']:,} "
            f"| {row['seconds_per_step']:.2f} | {row['seconds_per_step'] * 100 / 60:.1f} "
            f"| {'n/a' if peak is None else f'{peak / 2**20:,.0f}'} "
            f"| {domain['metric']}: {fmt.format(row['before']['metric'])} → "
            f"{fmt.format(row['after']['metric'])} | {row['forgetting']:+.1%} |"
        )
    return "\n".join(lines)


def write_docs(results: dict[str, Any], path: Path) -> None:
    """The markdown page: provenance, what each column means, the table."""
    p = results["provenance"]
    text = [
        "# Full fine-tuning, LoRA and QLoRA on three tasks (`make results`)",
        "",
        "Generated by `python -m course_tools.results` from `course_utils/data/results.json`; "
        "do not edit by hand.",
        "",
        f"- date: {p['date']}; profile: {results['profile']}; {len(results['rows'])} runs in "
        f"{p['seconds'] / 60:.0f} min",
        f"- machine: {', '.join(f'{k} {v}' for k, v in p['machine'].items())}",
        f"- versions: {', '.join(f'{k} {v}' for k, v in p['versions'].items())}",
        f"- command: `{p['command']}`",
        f"- every run: {results['steps']} steps of {BATCH_SIZE} examples, TRL SFTTrainer, linear "
        "schedule, seed 0; learning rates: "
        + ", ".join(f"{name} {spec['learning_rate']:g}" for name, spec in METHODS.items()),
        "- time per 100 steps = 100 × the median seconds per step (padding makes steps differ); "
        "with two runs at a time on one thread each, compare it between rows only roughly "
        "(`make bench` measures speed)",
        "- peak training MB: tensors alive at the peak of a training step (weights, gradients, "
        "optimizer state, activations), measured by the course's PeakMemory",
        "- forgetting: relative change of "
        + "; ".join(f"{d}: the {v['probe']}" for d, v in DOMAINS.items())
        + " (positive = worse), against the same base (QLoRA: the NF4 base)",
        "",
        table(results),
        "",
    ]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(text))


def check(results: object) -> dict[str, Any]:
    """Return `results` if it has the keys of a results file, else raise naming the first gap."""
    needed = {"provenance": dict, "profile": str, "steps": int, "rows": list}
    if not isinstance(results, dict) or any(
        not isinstance(results.get(k), t) for k, t in needed.items()
    ):
        raise ValueError(f"a results file holds {sorted(needed)}; run `make results`.")
    keys = ("domain", "method", "trainable_params", "seconds_per_step", "before", "after")
    for row in results["rows"]:
        missing = [k for k in (*keys, "forgetting", "peak_memory_bytes") if k not in row]
        if missing:
            raise ValueError(f"a row lacks {missing}; run `make results`.")
    return results


def load(path: str | Path | None = None) -> dict[str, Any]:
    """Load a results file (default: the one the course ships) and check its shape."""
    path = Path(path) if path is not None else RESULTS_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist; run `make results` to create it.")
    return check(json.loads(path.read_text()))


def main(argv: list[str] | None = None) -> int:
    """Run every (task, method) pair, or the ones named, and write the file and the page."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(prog="python -m course_tools.results", description=__doc__)
    parser.add_argument("--out", type=Path, default=RESULTS_FILE)
    parser.add_argument("--docs", type=Path, default=DOCS)
    parser.add_argument("--domains", nargs="+", help=f"some of {list(DOMAINS)}")
    parser.add_argument("--methods", nargs="+", help=f"some of {list(METHODS)}")
    parser.add_argument("--jobs", type=int, default=1, help="runs at a time (1 thread each)")
    args = parser.parse_args(argv)
    try:
        todo = jobs_of(args.domains, args.methods)
    except ValueError as error:
        print(error, file=sys.stderr)
        return 2
    if args.jobs < 1:
        print(f"--jobs must be 1 or more (got {args.jobs}); try --jobs 2.", file=sys.stderr)
        return 2
    started = time.perf_counter()
    rows = {}
    for i, row in enumerate(experiment.run_all(_start, _run, todo, args.jobs), 1):
        rows[row["domain"], row["method"]] = row
        print(f"[{i}/{len(todo)}] {row['domain']}, {row['method']}: {row['before']['metric']:.4g} "
              f"-> {row['after']['metric']:.4g} ({row['seconds_per_step']:.1f} s/step)", flush=True)  # fmt: skip
    command = "python -m course_tools.results " + " ".join(argv)
    results = {
        "provenance": experiment.provenance(command, time.perf_counter() - started, args.jobs),
        "profile": env.profile(),
        "steps": steps(),
        "domains": DOMAINS,
        "rows": [rows[job] for job in todo],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(check(results), indent=1) + "\n")
    write_docs(results, args.docs)
    print(table(results))
    print(f"wrote {args.out} and {args.docs}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
