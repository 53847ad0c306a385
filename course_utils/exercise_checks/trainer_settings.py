"""Settings the trainer exercises check alike (the exercises of lessons 05 and 13).

Both runs log every step, save no checkpoint and train in fp32 without gradient checkpointing,
where TRL's configs default to logging every 10 steps, bf16 and checkpointing.
"""

from __future__ import annotations

import contextlib
import logging
import warnings


@contextlib.contextmanager
def quiet():
    """Keep the libraries' warnings (pin_memory on a CPU, notices) off stderr, which nbgrader
    counts as a failed test; errors still raise."""
    logging.disable(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logging.disable(logging.NOTSET)


def setting(value):
    """An enum's value (TRL keeps some settings as enums), else the value."""
    return getattr(value, "value", value)


def plain_run_settings(args, config: str) -> tuple:
    """(holds, what is wrong, hint) for logging, saving, precision and checkpointing."""
    return (
        (
            setting(args.logging_strategy) == "steps" and args.logging_steps == 1,
            f"it logs every {args.logging_steps} steps, the run logs every step",
            "TRL logs every 10 steps by default: set logging_steps.",
        ),
        (
            setting(args.save_strategy) == "no",
            f"its save_strategy is {setting(args.save_strategy)!r}: it would save checkpoints",
            "save_strategy decides when checkpoints are written; this run writes none.",
        ),
        (
            not args.bf16 and not args.fp16,
            "it trains in half precision (bf16 or fp16), the run in fp32",
            f"TRL's {config} turns bf16 on by default: switch it off.",
        ),
        (
            not args.gradient_checkpointing,
            "it uses gradient checkpointing, the run does not",
            f"TRL's {config} turns gradient_checkpointing on by default: switch it off.",
        ),
    )
