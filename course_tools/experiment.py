"""A long experiment's runs (`make sweeps`, `make results`): a few at a time, quietly, recorded.

Two runs on one thread each keep a 2-core machine busy with no waiting between threads (torch's
OpenMP threads spin while they wait; a run on two threads next to anything else slows down
several fold), and each run's numbers come from a process nothing else ran in.
"""

from __future__ import annotations

import datetime
import logging
import multiprocessing
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor, as_completed
from typing import Any, TypeVar

import datasets
import torch

from course_tools.bench.common import machine

T = TypeVar("T")


def start_worker(make: Callable[[], Any], threads: int | None, slot: dict[str, Any]) -> None:
    """Use `threads` CPU threads (None: torch's default) and keep `make()` in `slot`."""
    if threads is not None:
        torch.set_num_threads(threads)
    slot["bench"] = make()


def run_all(
    start: Callable[[int | None], None],
    work: Callable[[T], Any],
    items: Iterable[T],
    jobs: int,
) -> Iterator[Any]:
    """Yield ``work(item)`` for every item, in this process (jobs=1) or `jobs` processes at once.

    `start(threads)` prepares a process once (it is given 1 thread in a worker, None here);
    both functions must be defined at module level so that a fresh process can import them.
    """
    items = list(items)
    if jobs == 1:
        start(None)
        yield from (work(item) for item in items)
        return
    context = multiprocessing.get_context("spawn")  # no forked copy of torch's thread pool
    with ProcessPoolExecutor(jobs, context, initializer=start, initargs=(1,)) as pool:
        for future in as_completed([pool.submit(work, item) for item in items]):
            yield future.result()


def quiet() -> None:
    """No progress bars from datasets, no notices from transformers (a log of many runs)."""
    datasets.disable_progress_bars()
    logging.getLogger("transformers").setLevel(logging.ERROR)


def provenance(command: str, seconds: float, jobs: int) -> dict[str, Any]:
    """When, where and with what an experiment's results were made."""
    info = machine()
    versions = {k: info.pop(k) for k in ("torch", "transformers", "peft", "trl") if k in info}
    if jobs > 1:
        info["torch threads"] = f"1 per run, {jobs} runs at a time"
    return {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": info,
        "versions": versions,
        "command": command,
        "seconds": round(seconds, 1),
    }
