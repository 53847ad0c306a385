"""Each lesson's wall time, measured: ``python -m course_tools.timings notebooks/*.ipynb`` (``make timings``).

Runs every notebook given top to bottom with the learner's profile (``COURSE_PROFILE=full``), in
a fresh kernel, and records its seconds per kind of machine (cpu or gpu) in the timings file
that ``course_utils.course_map`` reads for the course map.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import time
from pathlib import Path

import nbformat
import torch
from nbclient import NotebookClient

from course_utils.course_map import TIMINGS_FILE, course_map_markdown, load_timings


def machine_kind() -> tuple[str, str]:
    """Return ('cpu' or 'gpu', a short description of this machine)."""
    if torch.cuda.is_available():
        return "gpu", torch.cuda.get_device_name(0)
    return "cpu", f"{platform.machine()} CPU, {os.cpu_count()} cores"


def measure_notebook(path: Path, timeout: int = 3600, save_to: Path | None = None) -> float:
    """Run a notebook top to bottom (learner profile) in its own folder and return its seconds.

    With `save_to` (a folder) the executed notebook, outputs and all, is written there too.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"No notebook at {path}; pass a path like notebooks/00_start_here.ipynb."
        )
    notebook = nbformat.read(path, as_version=4)
    os.environ["COURSE_PROFILE"] = "full"
    client = NotebookClient(
        notebook,
        timeout=timeout,
        kernel_name="python3",
        resources={"metadata": {"path": path.parent}},
    )
    started = time.perf_counter()
    client.execute()
    seconds = time.perf_counter() - started
    if save_to is not None:
        Path(save_to).mkdir(parents=True, exist_ok=True)
        nbformat.write(notebook, Path(save_to) / path.name)
    return seconds


def record_timing(stem: str, seconds: float, path: Path = TIMINGS_FILE) -> dict:
    """Store one measured time for this kind of machine in the timings file and return it."""
    kind, machine = machine_kind()
    timings = load_timings(path)
    record = {"seconds": round(seconds, 1), "machine": machine, "date": str(_dt.date.today())}
    timings.setdefault(stem, {})[kind] = record
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(timings, indent=1, sort_keys=True, ensure_ascii=False) + "\n")
    return record


def main(argv: list[str] | None = None) -> int:
    """Command line: run and time the given notebooks, record the times, print the course map."""
    parser = argparse.ArgumentParser(
        prog="python -m course_tools.timings", description=main.__doc__
    )
    parser.add_argument("notebooks", nargs="+", type=Path)
    parser.add_argument("--save", type=Path, default=None, help="keep the executed notebooks here")
    args = parser.parse_args(argv)
    for notebook in args.notebooks:
        seconds = measure_notebook(notebook, save_to=args.save)
        record = record_timing(notebook.stem, seconds)
        print(f"{notebook.name}: {seconds:.0f} s on {record['machine']}")
    print(course_map_markdown())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
