"""The learner's own exercise folder, ``my-work/``: made from ``exercises/``, never overwritten.

``exercises/`` is generated from the masters and rewritten by ``make exercises`` and by every
course update (``git pull``); a learner's answers there would be lost or would conflict. So
``make course`` copies each exercise notebook into ``my-work/`` (ignored by git) the first time it
sees it, and afterwards only adds notebooks that are new. A notebook the course changed since it
was copied is reported, never replaced: the learner's copy stays as it is, and the new version
waits in ``exercises/`` to be compared with it. ``my-work/.copied.json`` records the hash of
each exercise as it was copied.

    python -m course_tools.my_work            # what make course runs before JupyterLab
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EXERCISES = ROOT / "exercises"
MY_WORK = ROOT / "my-work"
RECORD = ".copied.json"


def _digest(path: Path) -> str:
    """The SHA-256 of a file's bytes."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _record(work: Path) -> dict[str, str]:
    """{notebook path relative to my-work: hash of the exercise when it was copied}."""
    path = work / RECORD
    if not path.is_file():
        return {}
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}  # a damaged record only means that no update can be reported
    return record if isinstance(record, dict) else {}


def update(exercises: Path = EXERCISES, work: Path = MY_WORK) -> list[str]:
    """Copy the exercise notebooks `work` lacks; return one line per notebook copied or updated upstream."""
    exercises, work = Path(exercises), Path(work)
    if not exercises.is_dir():
        raise FileNotFoundError(
            f"No exercise folder at {exercises}; run this from the course repository "
            "(make exercises regenerates it)."
        )
    if work.exists() and not work.is_dir():
        raise NotADirectoryError(
            f"{work} is a file; move it away so your exercises can live there."
        )
    record = _record(work)
    said = []
    for source in sorted(exercises.glob("*/*.ipynb")):
        relative = source.relative_to(exercises).as_posix()
        target = work / relative
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)
            record[relative] = _digest(source)
            said.append(f"new exercise: {target.relative_to(work.parent)}")
        elif record.get(relative) not in (None, _digest(source)):
            said.append(
                f"the course updated {source.relative_to(exercises.parent)}; your "
                f"{target.relative_to(work.parent)} is kept as it is (compare the two to pick up "
                "the change, or delete yours to get the new one)"
            )
    work.mkdir(parents=True, exist_ok=True)
    (work / RECORD).write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")
    return said


def main(argv: list[str] | None = None) -> int:
    """Command line: bring my-work/ up to date with exercises/ and say what changed."""
    parser = argparse.ArgumentParser(prog="python -m course_tools.my_work", description=__doc__)
    parser.add_argument("--exercises", default=str(EXERCISES))
    parser.add_argument("--work", default=str(MY_WORK))
    args = parser.parse_args(argv)
    for line in update(Path(args.exercises), Path(args.work)):
        print(line)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
