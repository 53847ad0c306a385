"""``python -m course_tools.bench train|loss|eval|memory`` (what ``make bench`` runs).

``train``: speed, MFU and peak memory of each method (``training``); ``loss``: the fused loss
raced alone (``loss``); ``eval``: seconds per 100 held-out listings (``eval``); ``memory``: the
estimator against measured training steps (``memory``). ``_step`` and ``_workload`` are the
fresh child processes the benches start (``common.run_child``).
"""

from __future__ import annotations

import sys

from . import eval, loss, memory, training

COMMANDS = {
    "train": training.main,
    "loss": loss.main,
    "eval": eval.main,
    "memory": memory.main,
    "_step": memory.step_main,
    "_workload": training.workload_main,
}


def main(argv: list[str] | None = None) -> int:
    """Run one bench by name; say which names exist when none or another is given."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] not in COMMANDS:
        public = [name for name in COMMANDS if not name.startswith("_")]
        print(
            f"usage: python -m course_tools.bench {{{','.join(public)}}} [options]", file=sys.stderr
        )
        return 2
    return COMMANDS[argv[0]](argv[1:])


if __name__ == "__main__":
    raise SystemExit(main())
