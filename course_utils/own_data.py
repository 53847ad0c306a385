"""Your own data for fine-tuning: read a file in the shape you have, check it, convert it for TRL.

The capstone, lesson 15 ("Your own fine-tune"), reads this module. A data set comes in one of five
shapes (`SHAPES`), one record each:

- ``messages``: ``{"messages": [{"role": "user", "content": ...}, ...]}`` (OpenAI / TRL chat);
- ``alpaca``: ``{"instruction": ..., "input": ... (optional, may be ""), "output": ...}``, plus an
  optional ``"system"``;
- ``prompt_completion``: ``{"prompt": str, "completion": str}`` or its conversational form
  ``{"prompt": [messages], "completion": [messages]}``;
- ``sharegpt``: ``{"conversations": [{"from": "system" | "human" | "gpt", "value": ...}]}``
  (``"user"`` and ``"assistant"`` are accepted as from-values too);
- ``text``: ``{"text": ...}`` records, or a plain ``.txt`` file (continued pre-training).

Files: ``.jsonl`` (one JSON value per line), ``.json`` (one array of records) or ``.txt``. A
``.txt`` file is split on blank lines: each paragraph is one ``text`` record (so a long file gives
many examples, and a problem names the paragraph's first line).

`validate_file` reports every problem with its file and line, in the style of a compiler
(``rentals.jsonl:7: ...``); `convert_file` turns a clean file into what ``SFTTrainer`` takes:
conversational ``{"prompt": [...], "completion": [{"role": "assistant", ...}]}`` records for the
chat shapes (the last assistant turn is the completion, everything before it the prompt), and
``{"text": ...}`` records for text. `EXAMPLE_FILES` holds one shipped file per shape and
`BAD_EXAMPLES` small broken files, each with one problem to find.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from course_utils.data import (
    DATA_DIR,
    load_instruction_task,
    message_problem,
    python_reference_topics,
    to_prompt_completion,
    write_json_lines,
)

SHAPES = ("messages", "alpaca", "prompt_completion", "sharegpt", "text")
#: The keys that tell a record's shape, checked in this order.
SHAPE_KEYS = {
    "messages": ("messages",),
    "sharegpt": ("conversations",),
    "alpaca": ("instruction", "output"),
    "prompt_completion": ("prompt", "completion"),
    "text": ("text",),
}
#: ShareGPT's speakers and the chat role each one becomes.
SHAREGPT_ROLES = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
}
SUFFIXES = (".jsonl", ".json", ".txt")
#: Fewer examples than this leave nothing worth holding out as a test set.
MIN_EXAMPLES = 10
#: How many problems `convert_file`'s error lists.
PROBLEMS_SHOWN = 5

OWN_DATA_DIR = DATA_DIR / "own_data"
EXAMPLE_FILES: dict[str, Path] = {
    "messages": OWN_DATA_DIR / "rentals_messages.jsonl",
    "alpaca": OWN_DATA_DIR / "rentals_alpaca.json",
    "prompt_completion": OWN_DATA_DIR / "rentals_prompt_completion.jsonl",
    "sharegpt": OWN_DATA_DIR / "rentals_sharegpt.jsonl",
    "text": OWN_DATA_DIR / "python_reference.txt",
}
#: The rentals training examples the chat example files hold (the first ones, in order).
EXAMPLE_COUNT = 60
#: The Python reference topics (PSF licence) the text example file holds, in this order.
TEXT_TOPICS = (
    "assert", "pass", "del", "break", "continue", "if", "while", "for", "try", "with",
    "lambda", "global", "nonlocal", "booleans", "truth", "class",
)  # fmt: skip

#: The Python whose pydoc_data made the shipped text file (the reference text varies a little).
TEXT_PYTHON_VERSION = (3, 11)

Message = dict[str, str]


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a data file: where (file, 1-based line or None) and what to do."""

    file: str
    line: int | None
    message: str

    def __str__(self) -> str:
        """Write the problem as a compiler does: ``file:line: message``."""
        where = self.file if self.line is None else f"{self.file}:{self.line}"
        return f"{where}: {self.message}"


# ---------------------------------------------------------------------------------------------
# 1. Reading a file: records with their line numbers.
# ---------------------------------------------------------------------------------------------


def _check_path(path: object) -> Path:
    """Return `path` as a Path, or raise if it is not a file path."""
    if isinstance(path, bool) or not isinstance(path, str | os.PathLike):
        raise TypeError(
            f"path must be a file path (a str or a Path), not {type(path).__name__}; "
            "pass e.g. EXAMPLE_FILES['messages']."
        )
    return Path(path)


def _check_shape(shape: object) -> None:
    """Raise if `shape` is neither None nor one of SHAPES."""
    if shape is not None and shape not in SHAPES:
        raise ValueError(
            f"shape must be None (detect it) or one of {', '.join(SHAPES)} (got {shape!r})."
        )


def _bad_json(path: Path, error: json.JSONDecodeError, line: int) -> Problem:
    """The Problem of a line (or an array) that is not JSON."""
    return Problem(
        str(path),
        line,
        f"bad JSON ({error.msg} at column {error.colno}); fix the quotes, commas or brackets there.",
    )


def read_jsonl_records(path: Path) -> list[tuple[int, Any]]:
    """Records of a .jsonl file with their line numbers; a line that is not JSON is a Problem."""
    records = []
    for number, line in enumerate(path.read_text(encoding="utf-8-sig").splitlines(), start=1):
        if line.strip():
            try:
                records.append((number, json.loads(line)))
            except json.JSONDecodeError as error:
                records.append((number, _bad_json(path, error, number)))
    return records


_BETWEEN_ELEMENTS = re.compile(r"[\s,]*")  # what may come before an array element


def read_json_records(path: Path) -> list[tuple[int, Any]]:
    """Records of a .json array with the line each one starts on; bad JSON is one Problem."""
    text = path.read_text(encoding="utf-8-sig")
    try:
        array = json.loads(text)
    except json.JSONDecodeError as error:
        return [(error.lineno, _bad_json(path, error, error.lineno))]
    if not isinstance(array, list):
        message = (
            "a .json file must hold one array [{...}, {...}]; save one record per line as .jsonl"
        )
        return [(1, Problem(str(path), 1, message))]
    decoder, records = json.JSONDecoder(), []
    position = text.index("[") + 1
    for _ in array:  # walk the text element by element to find where each one starts
        position = _BETWEEN_ELEMENTS.match(text, position).end()
        record, end = decoder.raw_decode(text, position)
        records.append((text.count("\n", 0, position) + 1, record))
        position = end
    return records


def read_text_records(path: Path) -> list[tuple[int, Any]]:
    """Paragraphs (split on blank lines) of a .txt file as {"text": ...} records with their line."""
    records, paragraph, start = [], [], 0
    lines = path.read_text(encoding="utf-8-sig").splitlines()
    for number, line in enumerate([*lines, ""], start=1):
        if line.strip():
            start = start or number
            paragraph.append(line)
        elif paragraph:
            records.append((start, {"text": "\n".join(paragraph)}))
            paragraph, start = [], 0
    return records


def read_records(path: str | Path) -> list[tuple[int, Any]]:
    """Return (line, record) for each record of a .jsonl, .json or .txt file.

    A line that is not JSON comes back as (line, Problem) instead of raising, so that
    `validate_file` can report every problem at once.
    """
    path = _check_path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a folder; pass the data file inside it.")
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist; check the path and the current folder.")
    readers = {".jsonl": read_jsonl_records, ".json": read_json_records, ".txt": read_text_records}
    if path.suffix.lower() not in readers:
        raise ValueError(
            f"{path} is a {path.suffix or 'suffix-less'} file; save your data as .jsonl "
            "(one JSON object per line), .json (one array of objects) or .txt (plain text)."
        )
    return readers[path.suffix.lower()](path)


# ---------------------------------------------------------------------------------------------
# 2. Shapes and what can be wrong with a record of each.
# ---------------------------------------------------------------------------------------------


def detect_shape(record: object) -> str | None:
    """Return the shape of one record (one of SHAPES), or None if it has none of their keys."""
    if not isinstance(record, dict):
        return None
    for shape, keys in SHAPE_KEYS.items():
        if any(key in record for key in keys):
            return shape
    return None


def _text_problem(value: object, name: str) -> str | None:
    """What is wrong with a field that must be a non-empty string, or None."""
    if not isinstance(value, str):
        return f'"{name}" must be a string (got {type(value).__name__})'
    if not value.strip():
        return f'"{name}" is empty; write its text or drop the record'
    return None


def _chat_problem(messages: list) -> str | None:
    """What is wrong with a conversation (data.message_problem), or None; it must end with the answer."""
    problem = message_problem({"messages": messages})
    if problem is None and messages[-1]["role"] != "assistant":
        last = messages[-1]["role"]
        problem = (
            f"the conversation ends with a {last} turn after the last answer; drop it or answer it"
        )
    return problem


def messages_problem(record: dict) -> str | None:
    """What is wrong with a messages record, or None."""
    return _chat_problem(record["messages"])


def alpaca_problem(record: dict) -> str | None:
    """What is wrong with an alpaca record (instruction, optional input and system, output), or None."""
    if "output" not in record:
        return 'no "output": add the answer the model should learn to write'
    for name in ("instruction", "output"):
        problem = _text_problem(record.get(name), name)
        if problem:
            return problem
    if not isinstance(record.get("input", ""), str):
        return '"input" must be a string (it may be "")'
    if "system" in record:
        return _text_problem(record["system"], "system")
    return None


def prompt_completion_problem(record: dict) -> str | None:
    """What is wrong with a prompt/completion record (strings or message lists), or None."""
    for name in ("prompt", "completion"):
        if name not in record:
            return f'a "prompt" needs a "completion" (and a completion a prompt); no "{name}" here'
    prompt, completion = record["prompt"], record["completion"]
    if isinstance(prompt, list) and isinstance(completion, list):
        if not prompt:
            return 'the "prompt" is an empty list; put the messages before the answer in it'
        if not completion or any(
            m.get("role") != "assistant" for m in completion if isinstance(m, dict)
        ):
            return 'the "completion" must be the assistant\'s message(s)'
        return _chat_problem(prompt + completion)
    if isinstance(prompt, str) and isinstance(completion, str):
        return _text_problem(prompt, "prompt") or _text_problem(completion, "completion")
    return '"prompt" and "completion" must both be strings or both lists of messages'


def sharegpt_problem(record: dict) -> str | None:
    """What is wrong with a ShareGPT record, or None."""
    turns = record["conversations"]
    if not isinstance(turns, list) or not turns:
        return '"conversations" must be a non-empty list of {"from": ..., "value": ...} objects'
    for index, turn in enumerate(turns):
        if not isinstance(turn, dict) or str(turn.get("from")) not in SHAREGPT_ROLES:
            speaker = turn.get("from") if isinstance(turn, dict) else turn
            return f"turn {index} is from {speaker!r}; use one of {', '.join(SHAREGPT_ROLES)}"
        if not isinstance(turn.get("value"), str) or not turn["value"].strip():
            return f'turn {index} ({turn["from"]}) has an empty "value"; write its text'
    return _chat_problem(sharegpt_to_messages(record))


def text_problem(record: dict) -> str | None:
    """What is wrong with a text record, or None."""
    return _text_problem(record["text"], "text")


PROBLEM_CHECKS = {
    "messages": messages_problem,
    "alpaca": alpaca_problem,
    "prompt_completion": prompt_completion_problem,
    "sharegpt": sharegpt_problem,
    "text": text_problem,
}


def record_problem(record: object, shape: str) -> str | None:
    """Return what is wrong with `record` read as `shape`, or None if it is a valid record."""
    _check_shape(shape)
    if not isinstance(record, dict):
        return f"expected a JSON object, got {type(record).__name__}"
    if not any(key in record for key in SHAPE_KEYS[shape]):
        keys = " or ".join(f'"{key}"' for key in SHAPE_KEYS[shape])
        return f"not a {shape} record: it has no {keys} key"
    return PROBLEM_CHECKS[shape](record)


# ---------------------------------------------------------------------------------------------
# 3. A whole file: its shape and every problem.
# ---------------------------------------------------------------------------------------------


def _no_shape(record: object) -> str:
    """The message for a record of no known shape."""
    if not isinstance(record, dict):
        return f"expected a JSON object, got {type(record).__name__}; each record must be {{...}}"
    keys = ", ".join(repr(key) for key in record) or "none"
    return (
        f"a record of no known shape (keys: {keys}); give it the keys of one of {', '.join(SHAPES)}"
    )


#: What to do about data.message_problem's problems that do not say it themselves.
FIXES = {
    "no assistant turn": "add the assistant's answer as the last turn",
    "empty content": "write it or drop the record",
}


def _with_fix(problem: str) -> str:
    """The problem as a sentence, with what to do where the problem does not say it."""
    fix = next((f for words, f in FIXES.items() if words in problem and f not in problem), None)
    return f"{problem}; {fix}." if fix else f"{problem}."


def _record_problems(path: Path, records: list, shape: str | None) -> tuple[str | None, list]:
    """The file's shape (given, or the first record's) and the problems of every record."""
    file, problems, origin = str(path), [], "the shape you asked for"
    for line, record in records:
        if isinstance(record, Problem):
            problems.append(record)
            continue
        found = detect_shape(record)
        if found is None:
            problems.append(Problem(file, line, _no_shape(record)))
            continue
        if shape is None:
            shape, origin = found, f"line {line}"
        if found != shape:
            message = f"line {line} is {found} but the file is {shape} ({origin}): convert it or move it to its own file."
            problems.append(Problem(file, line, message))
        elif (problem := record_problem(record, shape)) is not None:
            problems.append(Problem(file, line, _with_fix(problem)))
    return shape, problems


def _size_problem(path: Path, records: list) -> Problem | None:
    """The whole-file problem of an empty file or one too small to split off a test set."""
    count = len(records)
    if count == 0:
        return Problem(str(path), None, f"the file holds no records; add at least {MIN_EXAMPLES}.")
    if count < MIN_EXAMPLES and not all(isinstance(r, Problem) for _, r in records):
        noun = "example is" if count == 1 else "examples are"
        return Problem(
            str(path),
            None,
            f"{count} {noun} not enough to split off a test set; add at least {MIN_EXAMPLES}.",
        )
    return None


def validate_file(path: str | Path, shape: str | None = None) -> tuple[str | None, list[Problem]]:
    """Return the file's shape (detected from its first record, or `shape`) and all its problems.

    Every problem names the file and line (None: the whole file) and says what to fix.
    """
    path = _check_path(path)
    _check_shape(shape)
    try:
        records = read_records(path)
    except UnicodeDecodeError:
        return shape, [Problem(str(path), None, "the file is not UTF-8 text; save it as UTF-8.")]
    except (OSError, ValueError) as error:  # missing, unreadable, unknown suffix
        return shape, [Problem(str(path), None, str(error).removeprefix(f"{path} "))]
    shape, problems = _record_problems(path, records, shape)
    size = _size_problem(path, records)
    return shape, problems + ([size] if size else [])


# ---------------------------------------------------------------------------------------------
# 4. Converting to what TRL's SFTTrainer takes.
# ---------------------------------------------------------------------------------------------


def alpaca_to_messages(record: dict) -> list[Message]:
    """Alpaca -> chat: the system (if any), instruction + input as the user, output as the answer."""
    user = record["instruction"]
    if record.get("input"):
        user = user + "\n\n" + record["input"]
    messages = [{"role": "system", "content": record["system"]}] if record.get("system") else []
    messages.append({"role": "user", "content": user})
    messages.append({"role": "assistant", "content": record["output"]})
    return messages


def sharegpt_to_messages(record: dict) -> list[Message]:
    """ShareGPT -> chat: each turn's "from" becomes a role (human -> user, gpt -> assistant)."""
    return [
        {"role": SHAREGPT_ROLES[turn["from"]], "content": turn["value"]}
        for turn in record["conversations"]
    ]


def prompt_completion_to_messages(record: dict) -> list[Message]:
    """Prompt/completion -> chat: strings become a user and an assistant turn, lists are joined."""
    if isinstance(record["prompt"], str):
        return [
            {"role": "user", "content": record["prompt"]},
            {"role": "assistant", "content": record["completion"]},
        ]
    return record["prompt"] + record["completion"]


def messages_to_messages(record: dict) -> list[Message]:
    """Messages -> chat: keep each turn's role and content (and drop any other field)."""
    return [{"role": m["role"], "content": m["content"]} for m in record["messages"]]


TO_MESSAGES = {
    "messages": messages_to_messages,
    "alpaca": alpaca_to_messages,
    "prompt_completion": prompt_completion_to_messages,
    "sharegpt": sharegpt_to_messages,
}


def to_conversational(record: dict, shape: str) -> dict[str, Any]:
    """One record -> TRL's conversational prompt/completion (chat shapes) or {"text": ...}."""
    if shape not in SHAPES:
        raise ValueError(
            f"shape must be one of {', '.join(SHAPES)} (got {shape!r}); see detect_shape."
        )
    problem = record_problem(record, shape)
    if problem is not None:
        raise ValueError(
            f"This {shape} record is not valid ({problem}); fix it, see validate_file."
        )
    if shape == "text":
        return {"text": record["text"]}
    messages = TO_MESSAGES[shape](record)
    return to_prompt_completion(
        {"messages": messages}
    )  # the last turn, the answer, is the completion


def convert_file(path: str | Path, shape: str | None = None) -> list[dict[str, Any]]:
    """Return the file's records converted for SFTTrainer; raise listing its problems if it has any."""
    shape, problems = validate_file(path, shape)
    if problems:
        shown = "\n  ".join(str(problem) for problem in problems[:PROBLEMS_SHOWN])
        more = len(problems) - PROBLEMS_SHOWN
        raise ValueError(
            f"{path} has {len(problems)} problem(s); fix them (validate_file lists all) and convert "
            f"again:\n  {shown}" + (f"\n  ... and {more} more" if more > 0 else "")
        )
    return [to_conversational(record, shape) for _, record in read_records(path)]


# ---------------------------------------------------------------------------------------------
# 5. The shipped example files (one per shape) and small broken ones.
# ---------------------------------------------------------------------------------------------


def _alpaca_record(example: dict) -> dict[str, str]:
    """A rentals chat example written as an alpaca record (system, instruction, empty input)."""
    system, user, assistant = (m["content"] for m in example["messages"])
    return {"system": system, "instruction": user, "input": "", "output": assistant}


def _sharegpt_record(example: dict) -> dict[str, list]:
    """A rentals chat example written as a ShareGPT record."""
    speakers = {"system": "system", "user": "human", "assistant": "gpt"}
    turns = [{"from": speakers[m["role"]], "value": m["content"]} for m in example["messages"]]
    return {"conversations": turns}


def python_reference_text() -> str:
    """The text example file: the TEXT_TOPICS of the Python reference, a blank line between."""
    topics = python_reference_topics("train")
    return "\n\n".join(topics[name].strip("\n") for name in TEXT_TOPICS) + "\n"


def write_example_files(folder: str | Path) -> dict[str, Path]:
    """Write the example file of each shape into `folder` and return {shape: path}."""
    folder = _check_path(folder)
    if folder.exists() and not folder.is_dir():
        raise NotADirectoryError(f"{folder} is a file; pass a folder to write the examples into.")
    folder.mkdir(parents=True, exist_ok=True)
    examples = load_instruction_task("train")[:EXAMPLE_COUNT]
    paths = {shape: folder / EXAMPLE_FILES[shape].name for shape in SHAPES}
    write_json_lines(paths["messages"], [{"messages": e["messages"]} for e in examples])
    alpaca = json.dumps([_alpaca_record(e) for e in examples], indent=2, ensure_ascii=False)
    paths["alpaca"].write_text(alpaca + "\n", encoding="utf-8", newline="\n")
    write_json_lines(paths["prompt_completion"], [to_prompt_completion(e) for e in examples])
    write_json_lines(paths["sharegpt"], [_sharegpt_record(e) for e in examples])
    paths["text"].write_text(python_reference_text(), encoding="utf-8", newline="\n")
    return paths


CAPITALS = (
    ("France", "Paris"), ("Japan", "Tokyo"), ("Kenya", "Nairobi"), ("Peru", "Lima"),
    ("Norway", "Oslo"), ("Egypt", "Cairo"), ("Canada", "Ottawa"), ("Chile", "Santiago"),
    ("Spain", "Madrid"), ("India", "New Delhi"),
)  # fmt: skip


def _chat_line(country: str, capital: str) -> str:
    """One small, valid messages record (a JSONL line)."""
    return json.dumps(
        {
            "messages": [
                {"role": "user", "content": f"Capital of {country}?"},
                {"role": "assistant", "content": capital},
            ]
        }
    )


def _broken(line: int, replacement: str) -> str:
    """The ten-line capitals file with line `line` (1-based) replaced."""
    lines = [_chat_line(country, capital) for country, capital in CAPITALS]
    lines[line - 1] = replacement
    return "\n".join(lines) + "\n"


def _alpaca_json(records: list[dict]) -> str:
    """A .json array of alpaca records, one per line (so record i starts on line i + 1)."""
    return "[\n" + ",\n".join("  " + json.dumps(r) for r in records) + "\n]\n"


#: Small broken files (file name -> text), each with one problem: ten records (MIN_EXAMPLES)
#: except the one-example file.
BAD_EXAMPLES: dict[str, str] = {
    "bad_json.jsonl": _broken(
        3, '{"messages": [{"role": "user", "content": "Capital of Kenya?"}, {"role": "assistant", "content": "Nairobi"}]'
    ),
    "no_assistant.jsonl": _broken(
        4, '{"messages": [{"role": "user", "content": "Capital of Peru?"}]}'
    ),
    "empty_content.jsonl": _broken(
        5, '{"messages": [{"role": "user", "content": "Capital of Norway?"}, {"role": "assistant", "content": ""}]}'
    ),
    "wrong_roles.jsonl": _broken(
        6, '{"messages": [{"role": "human", "content": "Capital of Egypt?"}, {"role": "bot", "content": "Cairo"}]}'
    ),
    "one_example.jsonl": _chat_line("France", "Paris") + "\n",
    "alpaca_no_output.json": _alpaca_json(
        [{"instruction": f"Capital of {country}?", "input": "", "output": capital} for country, capital in CAPITALS[:6]]
        + [{"instruction": "Capital of Canada?", "input": ""}]
        + [{"instruction": f"Capital of {country}?", "input": "", "output": capital} for country, capital in CAPITALS[7:]]
    ),
    "mixed_shapes.jsonl": _broken(
        7, '{"instruction": "Capital of Canada?", "input": "", "output": "Ottawa"}'
    ),
}  # fmt: skip
