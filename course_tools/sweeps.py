"""``make sweeps``: train every run of lesson 08's grid and write what each one measured.

``python -m course_tools.sweeps`` trains each run of `course_utils.hyperparameters` (lab 05's
LoRA run with one setting changed) with PEFT + TRL exactly as lab 05 does, scores it on held-out
data (rentals: exact match with a 95 % interval and the answers' validation loss; python:
held-out perplexity), and writes:

- ``course_utils/data/sweeps.json``: the provenance (date, machine, versions, command, time),
  the untrained model's scores, and every run's config, the LoraConfig and SFTConfig fields it
  ran with, its training record and its scores; written after every run, so an interrupted
  sweep goes on where it stopped (``--fresh`` starts over);
- ``docs/hyperparameters.md``: the generated recommendation table and one line per run;
- ``docs/images/hyperparameters.png``: one panel per knob.

``COURSE_PROFILE=ci`` shrinks the steps (an eighth) and the held-out sets, never the code path;
``--only ID`` runs only the named runs (the test runs the base run this way).
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.trainer_callback import PrinterCallback
from trl import SFTConfig, SFTTrainer

from course_tools import experiment, train
from course_utils import assets, data, env, evaluate
from course_utils import hyperparameters as hp
from course_utils.callbacks import TrainingMeter

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs" / "hyperparameters.md"
FIGURE = ROOT / "docs" / "images" / "hyperparameters.png"
BLOCK_SIZE = 128  # tokens per block of the causal-LM task
COMMAND = "python -m course_tools.sweeps "


def sizes() -> dict[str, int]:
    """How much held-out data scores each run, by profile."""
    return {
        "test_listings": env.by_profile(full=40, ci=4),
        "validation_listings": env.by_profile(full=40, ci=4),
        "perplexity_blocks": env.by_profile(full=32, ci=4),
    }


def ran_steps(config: dict[str, Any]) -> int:
    """The steps a run takes in this profile (CI: an eighth, at least one)."""
    return env.by_profile(full=config["max_steps"], ci=max(1, config["max_steps"] // 8))


class Workbench:
    """What every run shares: the device, the tokenizer and the tasks' data."""

    def __init__(self) -> None:
        self.device = env.pick_device()
        self.dtype = env.default_dtype(self.device)
        self.model_path = assets.model_path(verbose=False)
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_path)
        n = sizes()
        self.test = data.load_instruction_task("test")[: n["test_listings"]]
        self.validation = data.load_instruction_task("validation")[: n["validation_listings"]]
        self.reference = data.load_python_reference("validation")
        self.train_sets = {
            "rentals": data.prompt_completion_dataset(data.load_instruction_task("train")),
            "python": data.text_block_dataset(
                self.tokenizer, data.load_python_reference("train"), BLOCK_SIZE
            ),
        }

    def base_model(self):
        """A fresh copy of the pretrained model on the device."""
        return AutoModelForCausalLM.from_pretrained(self.model_path, dtype=self.dtype).to(
            self.device
        )

    def score(self, task: str, model) -> dict[str, Any]:
        """The task's held-out scores of `model`."""
        if task == "python":
            blocks = sizes()["perplexity_blocks"]
            return {
                "perplexity": evaluate.perplexity(
                    model, self.tokenizer, self.reference, max_blocks=blocks
                )
            }
        scored = evaluate.score_instruction(model, self.tokenizer, self.test)
        right = sum(scored["correct"])
        return {
            "exact_match": scored["exact_match"],
            "correct": right,
            "n": len(scored["correct"]),
            "interval": list(evaluate.wilson_interval(right, len(scored["correct"]))),
            "fields": sum(scored["fields"].values()) / len(scored["fields"]),
            "validation_loss": evaluate.answer_loss(model, self.tokenizer, self.validation),
        }

    def train_one(self, config: dict[str, Any]) -> dict[str, Any]:
        """Train one run of the grid as lab 05 does and return everything it measured."""
        rid = hp.run_id(config)
        env.seed_everything(config["seed"])  # the adapter's initial A is drawn from this seed
        lora_fields = {**hp.lora_kwargs(config), "bias": "none", "task_type": "CAUSAL_LM"}
        model = get_peft_model(self.base_model(), LoraConfig(**lora_fields))
        sft_fields = {**hp.sft_kwargs(config), "max_steps": ran_steps(config)}
        meter = TrainingMeter(rid, live_plot=False)
        with tempfile.TemporaryDirectory() as scratch:
            args = SFTConfig(
                output_dir=scratch,
                **sft_fields,
                logging_steps=1,
                save_strategy="no",
                report_to="none",
                gradient_checkpointing=False,
                dataloader_pin_memory=self.device.type == "cuda",
                disable_tqdm=True,
                **train.precision_flags(model),  # bf16/fp16 on a GPU, none on a CPU
            )
            trainer = SFTTrainer(
                model=model,
                args=args,
                train_dataset=self.train_sets[config["task"]],
                processing_class=self.tokenizer,
                callbacks=[meter],
            )
            trainer.remove_callback(PrinterCallback)  # the meter keeps the losses
            trainer.train()
        started = time.perf_counter()
        metrics = self.score(config["task"], model)
        record = meter.result
        run = {
            "id": rid,
            "config": config,
            "lora_config": lora_fields,
            "sft_config": sft_fields,
            "train": {
                "losses": [round(x, 5) for x in record.losses],
                "seconds": round(record.seconds, 1),
                "seconds_per_step": round(record.seconds_per_step, 3),
                "tokens": record.tokens,
                "trainable_params": record.trainable_params,
            },
            "metrics": metrics,
            "score_seconds": round(time.perf_counter() - started, 1),
        }
        del model
        gc.collect()
        return run


_SLOT: dict[str, Any] = {}


def _start(threads: int | None) -> None:
    """Prepare a process for runs: quiet libraries, the shared data loaded once."""
    experiment.quiet()
    experiment.start_worker(Workbench, threads, _SLOT)


def _train(config: dict[str, Any]) -> dict[str, Any]:
    """Train one run in a prepared process."""
    return _SLOT["bench"].train_one(config)


def load_previous(path: Path, fresh: bool) -> dict[str, Any]:
    """The results already written for this profile (to go on from), or an empty record."""
    if not fresh and path.exists():
        previous = json.loads(path.read_text())
        if previous.get("profile") == env.profile():
            return previous
    return {"profile": env.profile(), "before": {}, "runs": {}, "provenance": {"seconds": 0.0}}


def write(results: dict[str, Any], path: Path) -> None:
    """Write the results file (indented, the runs in the grid's order)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=1) + "\n")


def run_table(results: dict[str, Any]) -> str:
    """One markdown line per run: what changed, its scores and its time."""
    lines = [
        "| run | exact match (95 % interval) | validation loss | perplexity | last loss "
        "| s/step | trainable |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for rid, run in results["runs"].items():
        m, t = run["metrics"], run["train"]
        exact = (
            f"{m['exact_match']:.0%} ({m['interval'][0]:.0%}–{m['interval'][1]:.0%})"
            if "exact_match" in m
            else ""
        )
        loss = f"{m['validation_loss']:.4f}" if "validation_loss" in m else ""
        ppl = f"{m['perplexity']:.2f}" if "perplexity" in m else ""
        lines.append(
            f"| `{rid}` | {exact} | {loss} | {ppl} | {t['losses'][-1]:.4f} "
            f"| {t['seconds_per_step']:.2f} | {t['trainable_params']:,} |"
        )
    return "\n".join(lines)


def write_docs(results: dict[str, Any], docs: Path, figure: Path) -> None:
    """Write the markdown page and the figure, both generated from the results."""
    import matplotlib  # lazy: only the written figure needs it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # lazy: only the written figure needs it

    knobs = [k for k in hp.KNOBS if any(run for _, run in hp.runs_of(results, k))]
    cols = 4
    fig, axes = plt.subplots(
        math.ceil(len(knobs) / cols), cols, figsize=(16, 3.6 * math.ceil(len(knobs) / cols))
    )
    for ax, k in zip(axes.flat, knobs):
        hp.plot_knob(results, k, ax=ax)
    for ax in list(axes.flat)[len(knobs) :]:
        ax.axis("off")
    fig.tight_layout()
    figure.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(figure, dpi=80)
    plt.close(fig)
    p = results["provenance"]
    before = results["before"]
    text = [
        "# Hyperparameters, measured (`make sweeps`)",
        "",
        "Generated by `python -m course_tools.sweeps` from `course_utils/data/sweeps.json`; "
        "do not edit by hand. Lesson 08 draws the same table and plots from the same file.",
        "",
        f"- date: {p['date']}; profile: {results['profile']}; "
        f"{len(results['runs'])} runs in {p['seconds'] / 60:.0f} min",
        f"- machine: {', '.join(f'{k} {v}' for k, v in p['machine'].items())}",
        f"- versions: {', '.join(f'{k} {v}' for k, v in p['versions'].items())}",
        f"- command: `{p['command']}`",
        "- every run: PEFT LoRA + TRL SFTTrainer as lab 05, one setting changed from the base run "
        f"`{hp.run_id(hp.BASES['rentals'])}` ({json.dumps(hp.BASES['rentals'])})",
    ]
    if "rentals" in before:
        b = before["rentals"]
        text.append(
            f"- untrained model: exact match {b['exact_match']:.0%} on {b['n']} held-out "
            f"listings, validation loss {b['validation_loss']:.4f}"
        )
    if "python" in before:
        text.append(f"- untrained model: held-out perplexity {before['python']['perplexity']:.2f}")
    text += [
        "",
        "## The recommendation table",
        "",
        hp.recommendation_table(results),
        "",
        f"![every knob]({figure.relative_to(docs.parent).as_posix()})",
        "",
        "## Every run",
        "",
        run_table(results),
        "",
    ]
    docs.parent.mkdir(parents=True, exist_ok=True)
    docs.write_text("\n".join(text))


def parse(argv: list[str]) -> argparse.Namespace:
    """The command line."""
    parser = argparse.ArgumentParser(prog="python -m course_tools.sweeps", description=__doc__)
    parser.add_argument("--out", type=Path, default=hp.SWEEPS_FILE, help="the results JSON")
    parser.add_argument("--docs", type=Path, default=DOCS, help="the generated markdown page")
    parser.add_argument("--figure", type=Path, default=FIGURE, help="the generated figure")
    parser.add_argument("--only", nargs="+", metavar="ID", help="run only these run ids")
    parser.add_argument("--fresh", action="store_true", help="ignore results already written")
    parser.add_argument("--list", action="store_true", help="print the run ids and stop")
    parser.add_argument("--jobs", type=int, default=1, help="runs at a time (1 thread each)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Run the grid (or `--only` some runs), writing the results after every run."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse(argv)
    grid = hp.all_runs()
    if args.list:
        print("\n".join(grid))
        return 0
    unknown = sorted(set(args.only or ()) - set(grid))
    if unknown:
        print(f"unknown run ids {unknown}; `--list` prints them.", file=sys.stderr)
        return 2
    if args.jobs < 1:
        print(f"--jobs must be 1 or more (got {args.jobs}); try --jobs 2.", file=sys.stderr)
        return 2
    wanted = {rid: grid[rid] for rid in (args.only or grid)}
    experiment.quiet()
    results = load_previous(args.out, args.fresh)
    spent = results["provenance"].get("seconds", 0.0)
    started = time.perf_counter()
    missing = sorted({c["task"] for c in wanted.values()} - set(results["before"]))
    if missing:
        bench = Workbench()
        for task in missing:
            results["before"][task] = bench.score(task, bench.base_model())
        del bench
    todo = [rid for rid in wanted if results["runs"].get(rid, {}).get("config") != grid[rid]]
    print(f"{len(wanted) - len(todo)} of {len(wanted)} runs already done; {len(todo)} to go")
    for i, run in enumerate(
        experiment.run_all(_start, _train, [grid[rid] for rid in todo], args.jobs), 1
    ):
        results["runs"][run["id"]] = run
        results["runs"] = {r: results["runs"][r] for r in grid if r in results["runs"]}
        results["provenance"] = experiment.provenance(
            COMMAND + " ".join(argv), spent + time.perf_counter() - started, args.jobs
        )
        write(results, args.out)
        score = hp.metric(run)
        print(f"[{i}/{len(todo)}] {run['id']}: {score:.4g} ({run['train']['seconds']:.0f} s)")
        sys.stdout.flush()
    results["provenance"] = experiment.provenance(
        COMMAND + " ".join(argv), spent + time.perf_counter() - started, args.jobs
    )
    write(hp.check_results(results), args.out)
    write_docs(results, args.docs, args.figure)
    print(f"wrote {args.out}, {args.docs} and {args.figure}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
