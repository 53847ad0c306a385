"""Checks for the exercises of lesson 04 (Data preparation): valid chat examples, labels, blocks."""

from __future__ import annotations

import copy
import json

from course_utils.data import (
    group_texts,
    load_classification_task,
    load_instruction_task,
    message_problem,
    tokenize_with_assistant_mask,
)
from course_utils.exercise_checks.feedback import exercise, expect

IGNORE_INDEX = -100  # the label that the loss skips
#: The shipped examples the visible tests use, read once at import.
RENTALS = load_instruction_task("train")
STDLIB_DOCS = load_classification_task("train")


def turns(*pairs) -> dict:
    """An example made of (role, content) pairs."""
    return {"messages": [{"role": role, "content": content} for role, content in pairs]}


def _shown(example) -> str:
    """The example as JSON, cut short enough for a one-line verdict."""
    return json.dumps(example, ensure_ascii=False, default=str)[:160]


def _check_problem(example_problem, example) -> None:
    """Compare example_problem with the course's check on one example; explain a mismatch."""
    expected = message_problem(example)
    try:
        got = example_problem(copy.deepcopy(example))
    except NotImplementedError:
        raise
    except Exception as error:
        expect(
            False,
            f"example_problem raised {type(error).__name__}: {error} on {_shown(example)}. "
            "Hint: check the type of each part before you use it (a dict? a list? a string?) "
            "and return a string for anything that is not valid.",
        )
    if expected is None:
        expect(
            got is None,
            f"this example is valid, but example_problem says {got!r}: {_shown(example)}. "
            "Hint: a valid example has no problem to report: None (extra keys and a system message "
            "first are fine).",
        )
    else:
        expect(
            isinstance(got, str) and got.strip(),
            f"this example is not valid, but example_problem returned {got!r}: "
            f"{_shown(example)}. Hint: return a string saying what is wrong; course_utils.data "
            f"says: {expected}.",
        )


#: The examples of the visible test: shipped ones, then a valid and four broken ones.
EXAMPLE_CASES = [
    *RENTALS[:5],
    *STDLIB_DOCS[:5],
    turns(("user", "Hi"), ("assistant", "Hello!")),
    {"prompt": "Hi", "completion": "Hello!"},
    turns(("human", "Hi"), ("assistant", "Hello!")),
    turns(("user", "Hi")),
    turns(("user", "Hi"), ("assistant", "")),
]


@exercise(1, "example_problem")
def example_problem(example_problem, cases=EXAMPLE_CASES) -> str:
    """Exercise 1: example_problem(example) against course_utils.data.message_problem."""
    for example in cases:
        _check_problem(example_problem, example)
    files = {"rentals": RENTALS, "stdlib_docs": STDLIB_DOCS}
    return "\n".join(
        f"{name}: {len(examples)} examples, "
        f"{sum(example_problem(copy.deepcopy(e)) is not None for e in examples)} with a problem"
        for name, examples in files.items()
    )


def _answers(labels) -> int:
    """How many separate runs of graded tokens (answers) a list of labels has."""
    graded = [label != IGNORE_INDEX for label in labels]
    return sum(g and (i == 0 or not graded[i - 1]) for i, g in enumerate(graded))


def _label_hint(tokenizer, ids, labels, expected, i) -> str:
    """Why label i (the first wrong one) is wrong."""
    token = tokenizer.decode([ids[i]])
    if expected[i] == IGNORE_INDEX:
        if token == "\n" and i > 0 and ids[i - 1] == tokenizer.convert_tokens_to_ids("<|im_end|>"):
            return "the newline after <|im_end|> is layout between turns, not answer: -100."
        return "this token is part of the prompt (or of an <|im_start|>assistant header): -100."
    if labels[i] == IGNORE_INDEX:
        if token == "<|im_end|>":
            return "the <|im_end|> that closes an answer is learned too: the model must stop."
        if 0 < _answers(labels) < _answers(expected):
            return "label every assistant turn of the conversation, not only one of them."
        return "this token belongs to an assistant answer: its label is its own id."
    return "a label is either -100 or the id of the token at the same position."


def _check_labels(assistant_labels, tokenizer, messages) -> None:
    """Compare assistant_labels with the course's labels token by token; explain a mismatch."""
    given = copy.deepcopy(messages)
    got = assistant_labels(tokenizer, given)
    expect(
        given == messages,
        "assistant_labels changed the messages. Hint: build new lists, leave the input alone.",
    )
    expect(
        isinstance(got, dict) and {"input_ids", "labels"} <= set(got),
        f"assistant_labels must return a dict with input_ids and labels, got "
        f"{type(got).__name__}. Hint: return a dict with the keys 'input_ids' and 'labels'.",
    )
    expected = tokenize_with_assistant_mask(tokenizer, messages)
    ids, labels = list(got["input_ids"]), list(got["labels"])
    expect(
        ids == expected["input_ids"],
        f"input_ids differ from the template's tokens ({len(ids)} ids, expected "
        f"{len(expected['input_ids'])}). Hint: tokenize the chat template's text of the whole "
        "conversation as a string, without adding special tokens.",
    )
    expect(
        len(labels) == len(ids),
        f"{len(labels)} labels for {len(ids)} tokens. Hint: one label per token, no shift.",
    )
    if labels == expected["labels"]:
        return
    expect(
        labels[1:] != expected["labels"][:-1] and labels[:-1] != expected["labels"][1:],
        "the labels are shifted by one position. Hint: do not shift them: label t is the id "
        "of token t itself; the model shifts inside its loss.",
    )
    wrong = [i for i, (a, b) in enumerate(zip(labels, expected["labels"])) if a != b]
    i = wrong[0]
    expect(
        False,
        f"{len(wrong)} labels differ; the first is token {i}, {tokenizer.decode([ids[i]])!r}: "
        f"got {labels[i]}, expected {expected['labels'][i]}. "
        f"Hint: {_label_hint(tokenizer, ids, labels, expected['labels'], i)}",
    )


#: The conversation the notebook shows (its `short`).
SHORT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Is a bungalow a house?"},
    {"role": "assistant", "content": "Yes, a one-storey one."},
]
#: The conversations of the visible test.
LABEL_CASES = [SHORT, RENTALS[0]["messages"]]


@exercise(2, "assistant_labels")
def assistant_labels(assistant_labels, tokenizer, cases=LABEL_CASES) -> str:
    """Exercise 2: assistant_labels(tokenizer, messages) against tokenize_with_assistant_mask."""
    for messages in cases:
        _check_labels(assistant_labels, tokenizer, messages)
    feature = assistant_labels(tokenizer, copy.deepcopy(RENTALS[0]["messages"]))
    graded = [label for label in feature["labels"] if label != IGNORE_INDEX]
    return (
        f"rental example: {len(graded)} of {len(feature['labels'])} tokens graded:\n"
        f"{tokenizer.decode(graded)!r}"
    )


def _stream_length(lists, separator_id) -> int:
    """The number of tokens in the concatenated stream (a separator after each list)."""
    return sum(len(ids) + (separator_id is not None) for ids in lists)


def _cut(stream, block_size) -> list[list[int]]:
    """The full blocks of a stream (to recognise a stream built the wrong way)."""
    return [stream[i : i + block_size] for i in range(0, len(stream) - block_size + 1, block_size)]


def _blocks_hint(lists, blocks, expected, block_size, separator_id) -> str:
    """Why the blocks differ from the expected ones."""
    per_document = [
        list(ids[i : i + block_size])
        for ids in lists
        for i in range(0, len(ids) - block_size + 1, block_size)
    ]
    if any(len(block) != block_size for block in blocks):
        return "every block must hold exactly block_size tokens: drop the last partial block."
    if separator_id is not None:
        between = [
            t for index, ids in enumerate(lists) for t in [separator_id] * bool(index) + list(ids)
        ]
        before = [t for ids in lists for t in [separator_id, *ids]]
        if blocks in (
            _cut(between, block_size),
            _cut([t for ids in lists for t in ids], block_size),
        ):
            return "a separator_id goes after every token list, the last one included."
        if blocks == _cut(before, block_size):
            return "the separator_id goes after each token list, not before it."
    if blocks == per_document:
        return "concatenate all token lists into one stream first, then cut it into blocks."
    if len(blocks) != len(expected):
        counted = "" if separator_id is None else " (a separator after every list included)"
        return (
            f"{_stream_length(lists, separator_id):,} tokens{counted} make {len(expected)} "
            f"full blocks of {block_size}."
        )
    return "cut the concatenated stream at 0, block_size, 2 * block_size, ..."


def _check_no_block(group_into_blocks, lists, block_size, separator_id) -> None:
    """A stream shorter than one block must raise ValueError."""
    try:
        got = group_into_blocks(lists, block_size, separator_id=separator_id)
    except ValueError:
        return
    expect(
        False,
        f"{lists} with block_size={block_size} (separator_id={separator_id}) makes no full "
        f"block, but group_into_blocks returned {type(got).__name__} {str(got)[:60]}. "
        "Hint: an empty dataset would make training finish at once: raise ValueError.",
    )


def _check_blocks(group_into_blocks, lists, block_size, separator_id=None) -> int:
    """Compare group_into_blocks with group_texts; explain the first mismatch; return #blocks."""
    original = [list(ids) for ids in lists]
    try:
        expected = group_texts(original, block_size, separator_id=separator_id)
    except ValueError:
        _check_no_block(group_into_blocks, lists, block_size, separator_id)
        return 0
    try:
        got = group_into_blocks(lists, block_size, separator_id=separator_id)
    except ValueError as error:
        expect(
            False,
            f"group_into_blocks raised ValueError ({error}) although "
            f"{_stream_length(lists, separator_id):,} tokens make {len(expected['input_ids'])} "
            f"full blocks of {block_size}. Hint: raise only when the stream is shorter than one "
            "block.",
        )
    expect(
        [list(ids) for ids in lists] == original,
        "group_into_blocks changed token_lists. Hint: build a new stream, do not extend the inputs.",
    )
    keys = ("input_ids", "attention_mask", "labels")
    expect(
        isinstance(got, dict) and set(keys) <= set(got),
        f"group_into_blocks must return a dict with {keys}, got {type(got).__name__}. "
        "Hint: return a dict with these three keys, each a list of blocks.",
    )
    blocks = [list(block) for block in got["input_ids"]]
    if blocks != expected["input_ids"]:
        hint = _blocks_hint(lists, blocks, expected["input_ids"], block_size, separator_id)
        expect(
            False,
            f"got {len(blocks)} blocks, expected {len(expected['input_ids'])} "
            f"(block_size={block_size}, separator_id={separator_id}), and they differ. "
            f"Hint: {hint}",
        )
    labels = [list(block) for block in got["labels"]]
    if labels != expected["labels"]:
        shifted = [block[1:] for block in blocks] == [block[:-1] for block in labels]
        expect(
            False,
            "the labels are not a copy of input_ids. Hint: "
            + (
                "do not shift: the model shifts inside its loss."
                if shifted
                else "each block of labels holds the same ids as the block of input_ids."
            ),
        )
    expect(
        [list(mask) for mask in got["attention_mask"]] == expected["attention_mask"],
        "attention_mask must be a list of ones per block. Hint: one mask per block, with "
        "block_size ones in it: every token is real text.",
    )
    expect(
        all(a is not b for a, b in zip(got["labels"], got["input_ids"])),
        "labels and input_ids are the same list objects: changing one changes the other. "
        "Hint: give each block of labels a list of its own (a copy).",
    )
    return len(blocks)


@exercise(3, "group_into_blocks")
def group_into_blocks(group_into_blocks, token_lists, separator_id, tokenizer, cases=None) -> str:
    """Exercise 3: group_into_blocks(token_lists, block_size, separator_id) against group_texts.

    `cases` is a list of (token lists, block_size, separator_id); a case whose stream is shorter
    than one block must raise ValueError. Without it, the visible test: the notebook's
    `token_lists` in blocks of 128, without and with `separator_id`.
    """
    visible = [(token_lists, 128, None), (token_lists, 128, separator_id)]
    for lists, block_size, separator in visible if cases is None else cases:
        _check_blocks(group_into_blocks, lists, block_size, separator)
    if cases is not None:
        return ""
    blocks = group_into_blocks(token_lists, 128, separator_id=separator_id)
    n = _stream_length(token_lists, separator_id)
    return (
        f"{n:,} tokens -> {len(blocks['input_ids'])} blocks of 128, {n % 128} dropped\n"
        f"{tokenizer.decode(blocks['input_ids'][1][:30])!r}"
    )
