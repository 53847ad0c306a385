"""Lesson 04's exercise checks: the usual mistakes get the hint that names them."""

import pytest

from course_utils.exercise_checks import data_preparation as check

IGNORE_INDEX = -100
ROLES = ("system", "user", "assistant")


@pytest.fixture(autouse=True)
def _learner(monkeypatch):
    monkeypatch.delenv("NBGRADER_EXECUTION", raising=False)


def _said(capsys) -> str:
    return capsys.readouterr().out.strip()


# Exercise 1 -----------------------------------------------------------------------------------


def _right_problem(example):
    if not isinstance(example, dict) or "messages" not in example:
        return "not a chat example"
    messages = example["messages"]
    if not isinstance(messages, list) or not messages:
        return "no messages"
    for index, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in ROLES:
            return "bad message"
        content = message.get("content")
        if not isinstance(content, str) or not content.strip():
            return "empty"
        if message["role"] == "system" and index > 0:
            return "late system message"
    return None if any(m["role"] == "assistant" for m in messages) else "no answer"


def _no_assistant_check(example):
    problem = _right_problem(example)
    return None if problem == "no answer" else problem


def _crashes_on_other_keys(example):
    return None if example["messages"] else "empty"


def _rejects_extra_keys(example):
    return _right_problem(example) or (None if set(example) == {"messages"} else "extra keys")


@pytest.mark.parametrize(
    ("answer", "hint"),
    [
        (_no_assistant_check, "no assistant turn"),
        (_crashes_on_other_keys, "raised KeyError"),
        (_rejects_extra_keys, "a system message first are fine"),
        (lambda example: None, "return a string saying what is wrong"),
    ],
)
def test_example_problem_mistakes(answer, hint, capsys):
    check.example_problem(answer)
    said = _said(capsys)
    assert said.startswith("❌ Exercise 1") and hint in said and said.count("\n") == 0, said


def test_example_problem_right_reports_the_shipped_files(capsys):
    check.example_problem(_right_problem)
    assert _said(capsys).splitlines() == [
        "✅ Exercise 1: `example_problem` passes the tests.",
        f"rentals: {len(check.RENTALS)} examples, 0 with a problem",
        f"stdlib_docs: {len(check.STDLIB_DOCS)} examples, 0 with a problem",
    ]


def test_example_problem_late_system_message_is_caught_by_a_case(capsys):
    def no_order_check(example):
        return None if _right_problem(example) == "late system message" else _right_problem(example)

    late = check.turns(("user", "Hi"), ("system", "Be brief."), ("assistant", "Hello"))
    check.example_problem(no_order_check, cases=[late])
    assert "only the first message may be one" in _said(capsys)


# Exercise 2 -----------------------------------------------------------------------------------


def _labels(tokenizer, messages, *, end=lambda through: len(through.rstrip()), shift=False):
    """The reference recipe, with a knob for each typical mistake."""
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    spans = []
    for index, message in enumerate(messages):
        if message["role"] == "assistant":
            before = tokenizer.apply_chat_template(
                messages[:index], tokenize=False, add_generation_prompt=True
            )
            through = tokenizer.apply_chat_template(messages[: index + 1], tokenize=False)
            spans.append((len(before), end(through)))
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(encoded["input_ids"])
    labels = [
        token if any(s < span_end and e > span_start for span_start, span_end in spans) else -100
        for token, (s, e) in zip(ids, encoded["offset_mapping"])
    ]
    if shift:
        labels = labels[1:] + [IGNORE_INDEX]
    return {"input_ids": ids, "labels": labels}


@pytest.mark.parametrize(
    ("mistake", "hint"),
    [
        ({"end": lambda through: len(through.rstrip()) - len("<|im_end|>")}, "must stop"),
        ({"end": len}, "newline after <|im_end|>"),
        ({"shift": True}, "shifted by one position"),
    ],
)
def test_assistant_labels_mistakes(tokenizer, mistake, hint, capsys):
    check.assistant_labels(lambda tok, messages: _labels(tok, messages, **mistake), tokenizer)
    said = _said(capsys)
    assert said.startswith("❌ Exercise 2") and hint in said and said.count("\n") == 0, said


def test_assistant_labels_all_prompt_tokens_named(tokenizer, capsys):
    def everything(tok, messages):
        ids = tok(tok.apply_chat_template(messages, tokenize=False), add_special_tokens=False)
        return {"input_ids": ids["input_ids"], "labels": list(ids["input_ids"])}

    check.assistant_labels(everything, tokenizer)
    assert "part of the prompt" in _said(capsys)


def test_assistant_labels_only_the_last_turn_named(tokenizer, capsys):
    def last_only(tok, messages):
        got = _labels(tok, messages)
        labels = got["labels"]
        last = max(
            i
            for i, label in enumerate(labels)
            if label != IGNORE_INDEX and (i == 0 or labels[i - 1] == IGNORE_INDEX)
        )
        return {
            "input_ids": got["input_ids"],
            "labels": [IGNORE_INDEX if i < last else x for i, x in enumerate(labels)],
        }

    two_turns = [
        {"role": "user", "content": "Name a flat."},
        {"role": "assistant", "content": "A flat in Leeds."},
        {"role": "user", "content": "Its rent?"},
        {"role": "assistant", "content": "£900 a month."},
    ]
    check.assistant_labels(last_only, tokenizer, cases=[two_turns])
    assert "every assistant turn" in _said(capsys)


def test_assistant_labels_right_reports_the_graded_text(tokenizer, capsys):
    check.assistant_labels(_labels, tokenizer)
    lines = _said(capsys).splitlines()
    assert lines[0] == "✅ Exercise 2: `assistant_labels` passes the tests."
    assert lines[1].startswith("rental example:") and "<|im_end|>" in lines[2]


# Exercise 3 -----------------------------------------------------------------------------------

TOKEN_LISTS = [list(range(100 * d, 100 * d + 40 + 7 * d)) for d in range(12)]
SEPARATOR = 0


def _blocks(token_lists, block_size, separator_id=None, *, sep_between=False, keep=False):
    """The reference recipe, with a knob for each typical mistake."""
    stream = []
    for index, ids in enumerate(token_lists):
        if sep_between and index and separator_id is not None:
            stream.append(separator_id)
        stream.extend(ids)
        if not sep_between and separator_id is not None:
            stream.append(separator_id)
    if len(stream) < block_size:
        raise ValueError("short")
    ends = (
        range(0, len(stream), block_size)
        if keep
        else range(0, len(stream) - block_size + 1, block_size)
    )
    blocks = [stream[i : i + block_size] for i in ends]
    return {
        "input_ids": blocks,
        "attention_mask": [[1] * block_size for _ in blocks],
        "labels": [list(block) for block in blocks],
    }


def _run(answer, cases=None):
    more = {} if cases is None else {"cases": cases}  # cases=... means the grader's hidden tests
    check.group_into_blocks(answer, TOKEN_LISTS, SEPARATOR, _FakeTokenizer(), **more)


class _FakeTokenizer:
    def decode(self, ids):
        return " ".join(map(str, ids))


def _same_objects(*args, **kwargs):
    got = _blocks(*args, **kwargs)
    return dict(got, labels=got["input_ids"])


def _shifted(*args, **kwargs):
    got = _blocks(*args, **kwargs)
    return dict(got, labels=[block[1:] + [block[-1]] for block in got["input_ids"]])


def _per_document(token_lists, block_size, separator_id=None):
    blocks = [  # every document cut on its own
        list(ids[i : i + block_size])
        for ids in token_lists
        for i in range(0, len(ids) - block_size + 1, block_size)
    ]
    return {
        "input_ids": blocks,
        "attention_mask": [[1] * block_size for _ in blocks],
        "labels": [list(block) for block in blocks],
    }


@pytest.mark.parametrize(
    ("answer", "cases", "hint"),
    [
        (lambda t, b, separator_id=None: _blocks(t, b, separator_id, keep=True), None, "partial"),
        (_same_objects, None, "a list of its own"),
        (_shifted, None, "do not shift"),
        (_per_document, None, "concatenate all token lists into one stream"),
        (
            lambda t, b, separator_id=None: _blocks(t, b, separator_id, sep_between=True),
            [([[1, 2, 3], [], [4, 5], [6]], 2, 0)],
            "the last one included",
        ),
        (lambda t, b, separator_id=None: _blocks(t, b), None, "the last one included"),
        (
            lambda t, b, separator_id=None: _blocks(
                [[separator_id, *ids] for ids in t] if separator_id is not None else t, b
            ),
            None,
            "not before it",
        ),
        (lambda t, b, separator_id=None: _blocks(t, b, separator_id), [([[1, 2]], 4, 0)], None),
        (
            lambda t, b, separator_id=None: {"input_ids": [], "attention_mask": [], "labels": []},
            [([[1, 2, 3]], 4, None)],
            "raise ValueError",
        ),
    ],
)
def test_group_into_blocks_mistakes(answer, cases, hint, capsys):
    _run(answer, cases)
    said = _said(capsys)
    if hint is None:  # a right answer on a no-block case
        assert said.startswith("✅ Exercise 3"), said
    else:
        assert said.startswith("❌ Exercise 3") and hint in said and said.count("\n") == 0, said


def test_group_into_blocks_raising_on_a_full_block_is_named(capsys):
    def raises(token_lists, block_size, separator_id=None):
        raise ValueError("no")

    _run(raises)
    assert "raise only when the stream is shorter than one block" in _said(capsys)


def test_group_into_blocks_right_reports_the_blocks(capsys):
    _run(_blocks)
    lines = _said(capsys).splitlines()
    n = sum(len(ids) + 1 for ids in TOKEN_LISTS)
    assert lines[0] == "✅ Exercise 3: `group_into_blocks` passes the tests."
    assert lines[1] == f"{n:,} tokens -> {n // 128} blocks of 128, {n % 128} dropped"


def test_stubs_are_not_answered_yet(tokenizer, capsys):
    def stub(*args, **kwargs):
        raise NotImplementedError()

    check.example_problem(stub)
    check.assistant_labels(stub, tokenizer)
    _run(stub)
    lines = _said(capsys).splitlines()
    assert [line.split(" is not answered yet")[0] for line in lines] == [
        "⏳ Exercise 1",
        "⏳ Exercise 2",
        "⏳ Exercise 3",
    ], lines
