"""Every lesson: what its text claims, checked where it is measured, reported in one cell at the end.

Lessons 00-15 end with its report.

A lesson says "LoRA's loss went down" or "our NF4 codes equal bitsandbytes' bit for bit" next to
the number that shows it; `claims.add(...)` records that sentence with the measured truth, and the
lesson's last cell, `claims.report()`, lists them and fails (under `make test` too) if one does
not hold on this run. A failing claim does not stop the lesson where it is made: Run All reaches
the end, and the report names every claim that did not hold, with what was measured. A claim
recorded again (a cell run twice) replaces its earlier record.

    claims = Claims()
    claims.add("the fine-tuned model scores higher than the base", after > before, after=after)
    ...
    claims.report()
"""

from __future__ import annotations

__all__ = ["ClaimFailed", "Claims"]


class ClaimFailed(AssertionError):
    """One or more of a lesson's claims did not hold on this run."""


class Claims:
    """The claims a lesson makes, each a sentence and whether this run measured it true.

    Re-running a cell records its claim again in the same place: the latest run counts.
    """

    def __init__(self) -> None:
        self._by_sentence: dict[str, tuple[bool, dict]] = {}

    @property
    def items(self) -> list[tuple[str, bool, dict]]:
        """(sentence, holds, measured values) for every claim, in the order first made."""
        return [(claim, ok, measured) for claim, (ok, measured) in self._by_sentence.items()]

    def add(self, claim: str, holds: object, **measured: object) -> None:
        """Record `claim` (a sentence) with whether it `holds`, and the values that show it."""
        if not isinstance(claim, str) or not claim.strip():
            raise ValueError(f"claim must be a sentence (got {claim!r}); try 'the loss went down'.")
        try:
            ok = bool(holds)
        except (RuntimeError, ValueError) as error:  # a tensor or an array of several values
            raise ValueError(
                f"the condition of {claim.strip()!r} is not one True or False ({error}); "
                "reduce it first, e.g. with .all() or torch.equal(a, b)."
            ) from None
        self._by_sentence[claim.strip()] = (ok, measured)

    @property
    def failed(self) -> list[str]:
        """The claims that did not hold, each with the values recorded beside it."""
        return [_line(c, m) for c, ok, m in self.items if not ok]

    def report(self) -> None:
        """Print every claim with ✓ or ✗, then raise `ClaimFailed` if any did not hold."""
        if not self._by_sentence:
            raise ClaimFailed("no claim was recorded; call claims.add(...) where a claim is made.")
        for claim, ok, measured in self.items:
            print(("✓ " if ok else "✗ ") + _line(claim, measured))
        failed = self.failed
        if failed:
            raise ClaimFailed(
                f"{len(failed)} of {len(self.items)} claims did not hold: " + "; ".join(failed)
            )
        print(f"All {len(self.items)} claims of this lesson hold on this run.")


def _line(claim: str, measured: dict) -> str:
    """The claim with its measured values, as one line."""
    if not measured:
        return claim
    values = ", ".join(f"{k} = {_short(v)}" for k, v in measured.items())
    return f"{claim} ({values})"


def _short(value: object) -> str:
    """A measured value, short enough for one line."""
    if isinstance(value, float):
        return f"{value:.4g}"
    text = repr(value)
    return text if len(text) <= 120 else text[:117] + "..."
