"""Where training data comes from: check, de-duplicate and split examples, whatever their source.

Lesson 04, section 8, builds rentals examples three ways (an existing data set, examples written
by hand, candidates written by a model) and passes all of them through the same gate:

- `rental_problem(example)`: the reason a rentals example is unusable, or None. The course's JSONL
  checker first (`data.message_problem`), then the task's own rules: the answer is one JSON
  object with the schema's keys, value types and label sets (a studio has 0 bedrooms), and it
  agrees with the listing it was written from (the city, rent, period, property type and
  bedrooms it gives are in the listing);
- `keep_valid(candidates)`: (kept, rejected with its reason); the lesson writes it in a cell;
- `parse_candidate(text)`: a model's "Listing: ... / JSON: ..." text as a rentals example;
- `dedupe(examples)`: drop exact and normalised repeats (`normalise`: case, punctuation, spaces);
- `group_split(examples, group)`: a seeded split that keeps every group on one side, so two
  wordings of the same property never straddle train and test (`answer_key` is such a group).
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from course_utils import checks
from course_utils.data import (
    INSTRUCTION_SYSTEM,
    NUMBER_WORDS,
    PROPERTY_TYPES,
    TYPE_WORDS,
    UK_CITIES,
    message_problem,
    parse_json_answer,
)

Example = dict[str, Any]
#: The keys of a rentals answer, in the order the course writes them.
SCHEMA = ("bedrooms", "type", "city", "rent_gbp", "rent_period")
#: How a listing may say the rent period (the words the course's listings use, and two more).
PERIOD_PATTERNS = {
    "month": r"\bpcm\b|\bper (?:calendar )?month\b|/\s?month\b|\ba month\b|\bp/m\b|\bmonthly\b",
    "week": r"\bpw\b|\bper week\b|/\s?week\b|\ba week\b|\bp/w\b|\bweekly\b",
}
_BEDROOMS = re.compile(
    r"\b(\d+|" + "|".join(NUMBER_WORDS) + r")\s*-?\s*(?:bed|beds|bedroom|bedrooms|br)\b",
    flags=re.IGNORECASE,
)
_MONEY = re.compile(r"£\s?(\d[\d,]*(?:\.\d+)?)|(\d[\d,]*(?:\.\d+)?)\s?GBP\b", flags=re.IGNORECASE)
_CANDIDATE = re.compile(r"Listing:\s*(?P<listing>[^\n]*)(?:.*?JSON:(?P<json>[^}]*\}?))?", re.DOTALL)


def listing_text(example: Example) -> str:
    """Return the listing of a rentals example: the content of its user message."""
    users = [m["content"] for m in example["messages"] if m.get("role") == "user"]
    return users[-1] if users else ""


def _types_named(listing: str) -> set[str]:
    """The property types a listing names (a longer phrase wins: "studio flat" is a studio)."""
    found = []
    for kind, phrases in TYPE_WORDS.items():
        for phrase in set(phrases):
            for match in re.finditer(rf"\b{re.escape(phrase)}\b", listing, flags=re.IGNORECASE):
                found.append((match.end() - match.start(), match.start(), match.end(), kind))
    kept: list[tuple[int, int, str]] = []
    for _, start, end, kind in sorted(found, reverse=True):
        if all(end <= s or start >= e for s, e, _ in kept):
            kept.append((start, end, kind))
    return {kind for _, _, kind in kept}


def _rents_named(listing: str) -> list[float]:
    """The amounts of money a listing names (after £ or before GBP), deposits left out."""
    amounts = []
    for match in _MONEY.finditer(listing):
        if listing[: match.start()].lower().rstrip().endswith("deposit"):
            continue
        amounts.append(float((match.group(1) or match.group(2)).replace(",", "")))
    return amounts


def _bedrooms_named(listing: str) -> set[int]:
    """The bedroom counts a listing gives ("3-bed", "three bedroom", "3BR", "with 3 bedrooms")."""
    counts = set()
    for match in _BEDROOMS.finditer(listing):
        word = match.group(1).lower()
        counts.add(int(word) if word.isdigit() else NUMBER_WORDS.index(word))
    return counts


def _schema_problem(record: dict) -> str | None:
    """Why a parsed answer breaks the rentals schema (keys, types, label sets), or None."""
    if sorted(record) != sorted(SCHEMA):
        return f"the answer's keys are {sorted(record)}; the schema needs {', '.join(SCHEMA)}"
    bedrooms, rent = record["bedrooms"], record["rent_gbp"]
    if isinstance(bedrooms, bool) or not isinstance(bedrooms, int) or not 0 <= bedrooms <= 10:
        return f"bedrooms is {bedrooms!r}, not a whole number from 0 to 10"
    if record["type"] not in PROPERTY_TYPES:
        return f"type {record['type']!r} is not one of {', '.join(PROPERTY_TYPES)}"
    if (record["type"] == "studio") != (bedrooms == 0):
        return f"a {record['type']} with {bedrooms} bedrooms (a studio has 0, any other type 1 or more)"
    if record["city"] not in UK_CITIES:
        return f"city {record['city']!r} is not one of the task's UK cities"
    if isinstance(rent, bool) or not isinstance(rent, int) or rent <= 0:
        return f"rent_gbp is {rent!r}, not a positive whole number of pounds"
    if record["rent_period"] not in PERIOD_PATTERNS:
        return f"rent_period is {record['rent_period']!r}, not month or week"
    return None


def _consistency_problem(listing: str, record: dict) -> str | None:
    """Why a schema-valid answer disagrees with its listing, or None."""
    if "{" in listing:
        return "the listing contains JSON"
    if not re.search(rf"\b{re.escape(record['city'])}\b", listing, flags=re.IGNORECASE):
        return f"the listing does not mention the city {record['city']!r}"
    if record["rent_gbp"] not in _rents_named(listing):
        return f"the listing names no rent of £{record['rent_gbp']}"
    periods = [p for p, pattern in PERIOD_PATTERNS.items() if re.search(pattern, listing, re.I)]
    if periods != [record["rent_period"]]:
        said = " and per ".join(periods) if periods else "no period"
        return f"the listing gives per {said}, the answer says {record['rent_period']}"
    types = _types_named(listing)
    if types != {record["type"]}:
        said = ", ".join(sorted(types)) if types else "no property type"
        return f"the listing names {said}, the answer says {record['type']}"
    counts = _bedrooms_named(listing) or ({0} if record["type"] == "studio" else set())
    if counts != {record["bedrooms"]}:
        said = ", ".join(map(str, sorted(counts))) if counts else "no number of"
        return f"the listing gives {said} bedrooms, the answer says {record['bedrooms']}"
    return None


def rental_problem(example: object) -> str | None:
    """Return why `example` is not a usable rentals example, or None.

    The reason starts with the check that failed: "format:" (the JSONL checker, one JSON object),
    "schema:" (keys, value types, label sets) or "listing:" (the answer disagrees with its listing).
    """
    if isinstance(example, Mapping) and not isinstance(example, dict):
        example = dict(example)  # a row of a datasets.Dataset (.filter and .map pass a LazyRow)
    problem = message_problem(example)
    if problem is not None:
        return f"format: {problem}"
    roles = [m["role"] for m in example["messages"]]  # type: ignore[index]
    if roles != ["system", "user", "assistant"]:
        return f"format: the roles are {roles}; a rentals example is system, user, assistant"
    record = parse_json_answer(example["messages"][2]["content"])  # type: ignore[index]
    if record is None:
        return "format: the answer is not one JSON object"
    problem = _schema_problem(record)
    if problem is not None:
        return f"schema: {problem}"
    problem = _consistency_problem(listing_text(example), record)
    return None if problem is None else f"listing: {problem}"


def keep_valid(candidates, problem=rental_problem):
    """Split candidates into (kept, [(rejected, reason)]): a filter that says why it drops each."""
    kept, rejected = [], []
    for candidate in candidates:
        reason = problem(candidate)
        if reason is None:
            kept.append(candidate)
        else:
            rejected.append((candidate, reason))
    return kept, rejected


def parse_candidate(text: str) -> Example:
    """Turn a model's "Listing: ... / JSON: {...}" text into a rentals example (parts may be empty)."""
    if not isinstance(text, str):
        raise checks.WrongType(f"text must be the model's answer as a string (got {text!r}).")
    match = _CANDIDATE.search(text)
    listing = match["listing"].strip() if match else ""
    answer = (match["json"] or "").strip() if match else ""
    return {
        "messages": [
            {"role": "system", "content": INSTRUCTION_SYSTEM},
            {"role": "user", "content": listing},
            {"role": "assistant", "content": answer},
        ]
    }


def normalise(text: str) -> str:
    """Return `text` lower-cased, without punctuation, with single spaces: near-copies meet."""
    if not isinstance(text, str):
        raise checks.WrongType(f"text must be a string (got {type(text).__name__}).")
    return " ".join(re.sub(r"[^\w\s]", "", text.casefold()).split())


def _check_examples(examples: object) -> None:
    """Raise unless `examples` is a list of dicts."""
    if isinstance(examples, str | dict) or not isinstance(examples, Sequence):
        raise checks.WrongType("examples must be a list of {'messages': [...]} dicts.")
    if not all(isinstance(e, dict) for e in examples):
        raise checks.WrongType("every item of examples must be a {'messages': [...]} dict.")


def dedupe(
    examples: Sequence[Example], key: Callable[[Example], str] = listing_text
) -> tuple[list[Example], list[tuple[Example, str]]]:
    """Keep the first of each repeat of key(example), exact or once normalised; say why each went."""
    _check_examples(examples)
    if not callable(key):
        raise checks.WrongType("key must be a function of an example, e.g. curation.listing_text.")
    exact: dict[str, int] = {}
    close: dict[str, int] = {}
    kept, dropped = [], []
    for index, example in enumerate(examples):
        text = key(example)
        if text in exact:
            dropped.append((example, f"exact duplicate of example {exact[text]}"))
        elif normalise(text) in close:
            dropped.append((example, f"same as example {close[normalise(text)]} once normalised"))
        else:
            exact[text] = close[normalise(text)] = index
            kept.append(example)
    return kept, dropped


def answer_key(example: Example) -> str:
    """Return the example's answer as canonical JSON: one group per property, however worded."""
    answer = example["messages"][-1]["content"]
    record = parse_json_answer(answer)
    return answer if record is None else json.dumps(record, sort_keys=True)


def group_split(
    examples: Sequence[Example],
    group: Callable[[Example], str] = answer_key,
    test_fraction: float = 0.25,
    seed: int = 0,
) -> tuple[list[Example], list[Example]]:
    """Seeded (train, test) split that keeps each group(example) on one side; original order kept."""
    _check_examples(examples)
    checks.fraction(test_fraction, "test_fraction", "0.25")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise checks.WrongType(f"seed must be an integer (got {seed!r}); try seed=0.")
    groups = [group(e) for e in examples]
    order = sorted(set(groups))
    random.Random(seed).shuffle(order)
    wanted, test_groups = test_fraction * len(examples), set()
    for name in order:
        if sum(g in test_groups for g in groups) >= wanted:
            break
        test_groups.add(name)
    if not test_groups or len(test_groups) == len(order):
        raise ValueError(
            f"{len(order)} groups cannot be split {1 - test_fraction:.0%}/{test_fraction:.0%} "
            "with both sides non-empty; add examples or change test_fraction."
        )
    train = [e for e, g in zip(examples, groups) if g not in test_groups]
    return train, [e for e, g in zip(examples, groups) if g in test_groups]
