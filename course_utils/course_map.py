"""The course map: every lesson, what it teaches, and how long it took on real machines.

Lesson 00 prints it.

Times are never typed in: `python -m course_tools.timings notebooks/*.ipynb` (or
`make timings`) runs each notebook top to bottom with the learner's profile and records its wall
time, the machine and the date in ``course_utils/data/timings.json``. A lesson nobody has timed on
a kind of machine says so instead of guessing.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

TIMINGS_FILE = Path(__file__).parent / "data" / "timings.json"
NOTEBOOKS_DIR = Path(__file__).resolve().parent.parent / "notebooks"


@dataclass(frozen=True)
class Lesson:
    """One lesson of the course."""

    number: int
    slug: str
    title: str
    teaches: str

    @property
    def notebook(self) -> str:
        """Return the notebook's file name, e.g. '02_lora_math.ipynb'."""
        return f"{self.number:02d}_{self.slug}.ipynb"


LESSONS: tuple[Lesson, ...] = (
    Lesson(0, "start_here", "Start here", "set-up check, device, versions, a first generation"),
    Lesson(
        1,
        "why_finetune",
        "Why fine-tune",
        "prompting vs RAG vs fine-tuning; the cost of full FT; choosing a base model",
    ),
    Lesson(2, "lora_math", "The LoRA math", "ΔW ≈ AB, rank, SVD, α/r scaling, LoRA from scratch"),
    Lesson(
        3,
        "quantization",
        "Quantization",
        "bytes per dtype, absmax, blockwise, NF4, double quant; QAT vs PTQ",
    ),
    Lesson(
        4,
        "data_preparation",
        "Data preparation",
        "chat templates, assistant-only labels; data from a data set, by hand, from a model",
    ),
    Lesson(5, "lora_lab", "LoRA lab", "PEFT LoRA on SmolLM2, before/after, save and merge"),
    Lesson(6, "qlora_lab", "QLoRA lab", "NF4 base + LoRA, memory measured"),
    Lesson(7, "full_finetuning_lab", "Full fine-tuning lab", "forgetting and the comparison table"),
    Lesson(
        8,
        "hyperparameters",
        "Hyperparameters, measured",
        "every knob of the usual LoRA recommendation table, measured by `make sweeps`",
    ),
    Lesson(
        9,
        "beyond_one_machine",
        "Beyond one machine",
        "DDP and FSDP on 2 processes, ZeRO/FSDP bytes per device, a cluster launch",
    ),
    Lesson(10, "unsloth_lab", "Unsloth lab", "the same task with Unsloth"),
    Lesson(
        11,
        "frameworks",
        "Frameworks and services",
        "the same run as TRL, Axolotl and LLaMA-Factory; hosted services compared",
    ),
    Lesson(12, "lora_zoo", "The LoRA zoo", "LoRA variants behind a one-line switch"),
    Lesson(13, "preference_tuning", "Preference tuning", "DPO with TRL; PPO explained"),
    Lesson(14, "merge_and_deploy", "Merge and deploy", "merging, adapters, export, inference"),
    Lesson(
        15,
        "your_own_finetune",
        "Capstone: your own fine-tune",
        "your file in any common shape: convert, validate, choose, train, score, export",
    ),
)


def load_timings(path: Path = TIMINGS_FILE) -> dict[str, dict]:
    """Return the recorded timings: {notebook stem: {"cpu"|"gpu": {seconds, machine, date}}}."""
    if not path.is_file():
        return {}
    return json.loads(path.read_text())


def _format_time(record: dict | None) -> str:
    """Return a measured time as '3 min' / '40 s', or 'not timed yet'."""
    if not record:
        return "not timed yet"
    seconds = record["seconds"]
    return f"{seconds / 60:.0f} min" if seconds >= 90 else f"{seconds:.0f} s"


def course_map(notebooks_dir: Path | None = None) -> list[dict[str, str]]:
    """Return one row per lesson: number, title, teaches, status, time on CPU and on GPU."""
    folder = Path(notebooks_dir) if notebooks_dir is not None else NOTEBOOKS_DIR
    timings = load_timings()
    rows = []
    for lesson in LESSONS:
        stem = lesson.notebook.removesuffix(".ipynb")
        recorded = timings.get(stem, {})
        rows.append(
            {
                "#": f"{lesson.number:02d}",
                "lesson": lesson.title,
                "teaches": lesson.teaches,
                "status": "ready" if (folder / lesson.notebook).is_file() else "coming",
                "CPU (2 cores)": _format_time(recorded.get("cpu")),
                "GPU": _format_time(recorded.get("gpu")),
            }
        )
    return rows


def course_map_markdown(notebooks_dir: Path | None = None) -> str:
    """Return the course map as a Markdown table (for a notebook's display or the README)."""
    rows = course_map(notebooks_dir)
    header = list(rows[0])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row[h] for h in header) + " |" for row in rows]
    return "\n".join(lines)


if __name__ == "__main__":
    print(course_map_markdown())
