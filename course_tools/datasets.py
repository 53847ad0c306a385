"""The data sets the package ships, written from code: ``python -m course_tools.datasets --write | --check``.

``course_utils.data`` reads, formats and masks them (lesson 04); this module builds every split
from a seed (the rentals listings, the standard-library docstrings, lesson 13's preference pairs)
and writes the JSONL files and their manifest (file names, example counts, SHA-256) into
``course_utils/data/``. ``--check`` rebuilds them in a temporary folder and compares.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import inspect
import json
import os
import random
import re
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any

from course_utils.data import (
    DATA_DIR,
    LIBRARY_SECTIONS,
    MANIFEST,
    SEED,
    SPLITS,
    Example,
    classification_example,
    instruction_example,
    make_listing,
    write_jsonl,
)
from course_utils.preference import PREFERENCE_STEM, build_preference_pairs, write_pairs

INSTRUCTION_SIZES = {"train": 400, "validation": 50, "test": 100}


def build_instruction_task(seed: int = SEED) -> dict[str, list[Example]]:
    """Generate the rentals task: unique listings, split 400/50/100 (train/validation/test)."""
    rng = random.Random(seed)
    seen: set[str] = set()
    examples = []
    total = sum(INSTRUCTION_SIZES.values())
    while len(examples) < total:
        sentence, record = make_listing(rng)
        if sentence.lower() in seen:
            continue
        seen.add(sentence.lower())
        examples.append(instruction_example(sentence, record))
    splits, start = {}, 0
    for split, size in INSTRUCTION_SIZES.items():
        splits[split] = examples[start : start + size]
        start += size
    return splits


CLASSIFICATION_PER_LABEL = {"train": 42, "validation": 6, "test": 12}


_SIGNATURE_ONLY = re.compile(r"^[\w.]+\(.*\)( -> .*)?$")


def _first_paragraph(doc: str) -> str:
    """Return the first paragraph of a docstring on one line."""
    paragraph = re.split(r"\n\s*\n", inspect.cleandoc(doc).strip())[0]
    return " ".join(paragraph.split())


def _module_objects(module_name: str) -> list[tuple[str, object]]:
    """Return (qualified name, object) of a module's public functions, classes and methods."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        module = importlib.import_module(module_name)
    found: list[tuple[str, object]] = []
    leaf = module_name.split(".")[-1]
    for name in sorted(dir(module)):
        if name.startswith("_"):
            continue
        obj = getattr(module, name, None)
        if not (inspect.isclass(obj) or inspect.isroutine(obj)):
            continue
        home = getattr(obj, "__module__", None) or ""
        if not (
            home == module_name or home.lstrip("_") == leaf or home.startswith(module_name + ".")
        ):
            continue  # imported from elsewhere: it belongs to another module's section
        found.append((f"{module_name}.{name}", obj))
        if inspect.isclass(obj):
            for attr, value in sorted(vars(obj).items()):
                if attr.startswith("_"):
                    continue
                value = getattr(value, "__func__", value)
                if inspect.isroutine(value) or isinstance(value, property):
                    found.append((f"{module_name}.{name}.{attr}", value))
    return found


def stdlib_docstrings() -> dict[str, list[tuple[str, str]]]:
    """Return {label: sorted [(text, source)]} of usable first paragraphs of stdlib docstrings."""
    by_text: dict[str, set[str]] = {}
    source_of: dict[str, str] = {}
    for label, modules in LIBRARY_SECTIONS.items():
        for module_name in modules:
            for source, obj in _module_objects(module_name):
                doc = getattr(obj, "__doc__", None)
                if not isinstance(doc, str) or not doc.strip():
                    continue
                text = _first_paragraph(doc)
                if not 40 <= len(text) <= 400 or _SIGNATURE_ONLY.match(text):
                    continue
                by_text.setdefault(text, set()).add(label)
                source_of.setdefault(text, source)
    result: dict[str, list[tuple[str, str]]] = {label: [] for label in LIBRARY_SECTIONS}
    for text, labels in sorted(by_text.items()):
        if len(labels) == 1:  # a text found under two sections cannot be labelled honestly
            result[labels.pop()].append((text, source_of[text]))
    return result


def build_classification_task(seed: int = SEED) -> dict[str, list[Example]]:
    """Sample a balanced docstring -> section task (per label 42/6/12) from this Python's stdlib."""
    rng = random.Random(seed)
    splits: dict[str, list[Example]] = {split: [] for split in SPLITS}
    needed = sum(CLASSIFICATION_PER_LABEL.values())
    for label, items in stdlib_docstrings().items():
        if len(items) < needed:
            raise ValueError(
                f"Only {len(items)} docstrings for {label!r} in this Python; {needed} are needed."
            )
        chosen = rng.sample(items, needed)
        start = 0
        for split, size in CLASSIFICATION_PER_LABEL.items():
            splits[split] += [
                classification_example(t, label, s) for t, s in chosen[start : start + size]
            ]
            start += size
    for examples in splits.values():
        rng.shuffle(examples)
    return splits


def file_digest(path: Path) -> str:
    """Return the SHA-256 of a file."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


def write_datasets(folder: str | Path = DATA_DIR, seed: int = SEED) -> dict[str, Any]:
    """Regenerate the rentals, stdlib_docs and rentals_preference JSONL files and their manifest."""
    folder = Path(folder)
    files = {}
    rentals = build_instruction_task(seed)
    for stem, splits in (("rentals", rentals), ("stdlib_docs", build_classification_task(seed))):
        for split, examples in splits.items():
            path = write_jsonl(folder / f"{stem}_{split}.jsonl", examples)
            files[path.name] = {"examples": len(examples), "sha256": file_digest(path)}
    for name, path in write_preference_files(folder, seed, rentals).items():
        lines = sum(1 for line in path.read_text(encoding="utf-8").splitlines() if line.strip())
        files[name] = {"examples": lines, "sha256": file_digest(path)}
    manifest = {
        "seed": seed,
        "stdlib_docs_python": f"{sys.version_info.major}.{sys.version_info.minor}",
        "files": files,
    }
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
    return manifest


def main(argv: list[str] | None = None) -> int:
    """Command line: ``python -m course_tools.datasets --write | --check`` for the shipped datasets."""
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--write", action="store_true", help="regenerate course_utils/data/*.jsonl")
    parser.add_argument("--check", action="store_true", help="regenerate in a temp dir and compare")
    args = parser.parse_args(argv)
    if args.write:
        manifest = write_datasets(DATA_DIR)
        for name, info in manifest["files"].items():
            print(f"{name:32s} {info['examples']:4d} examples")
        return 0
    with tempfile.TemporaryDirectory() as scratch:
        fresh = write_datasets(scratch)["files"]
    shipped = json.loads((DATA_DIR / MANIFEST).read_text())["files"]
    differ = [
        name for name in fresh if fresh[name]["sha256"] != shipped.get(name, {}).get("sha256")
    ]
    print("identical" if not differ else f"differ: {', '.join(differ)}")
    return 1 if differ else 0


def write_preference_files(
    folder: str | os.PathLike, seed: int = SEED, rentals: dict | None = None
) -> dict[str, Path]:
    """Write every preference split into `folder`; return {file name: path}."""
    folder = Path(folder)
    written = {}
    for split, pairs in build_preference_pairs(seed, rentals).items():
        path = write_pairs(folder / f"{PREFERENCE_STEM}_{split}.jsonl", pairs)
        written[path.name] = path
    return written


if __name__ == "__main__":
    raise SystemExit(main())
