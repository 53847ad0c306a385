"""Tests for course_utils.own_data: reading, checking and converting a learner's own data file."""

from __future__ import annotations

import json
import math
import re
import sys

import pytest

from course_utils import own_data
from course_utils.data import load_instruction_task, reference_answer, to_prompt_completion
from course_utils.own_data import (
    BAD_EXAMPLES,
    EXAMPLE_COUNT,
    EXAMPLE_FILES,
    MIN_EXAMPLES,
    SHAPES,
    Problem,
    convert_file,
    detect_shape,
    read_records,
    to_conversational,
    validate_file,
    write_example_files,
)

CHAT_SHAPES = ("messages", "alpaca", "prompt_completion", "sharegpt")

# Each broken example: the line of its one problem (None: the whole file) and words it must say.
EXPECTED_PROBLEMS = {
    "bad_json.jsonl": (3, ("bad JSON", "fix")),
    "no_assistant.jsonl": (4, ("no assistant turn", "add the assistant's answer")),
    "empty_content.jsonl": (5, ("empty content", "write it or drop")),
    "wrong_roles.jsonl": (6, ("role 'human'", "system, user, assistant")),
    "one_example.jsonl": (None, ("1 example is not enough", f"add at least {MIN_EXAMPLES}")),
    "alpaca_no_output.json": (8, ('no "output"', "add the answer")),
    "mixed_shapes.jsonl": (
        7,
        ("line 7 is alpaca but the file is messages (line 1)", "convert it or move it"),
    ),
}


def one_sentence(message: str) -> bool:
    """A one-sentence error: one line, ending with a full stop."""
    return "\n" not in message and message.rstrip().endswith(".")


def write(tmp_path, name: str, text: str):
    """Write `text` to tmp_path/name and return the path."""
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def chat_lines(n: int) -> list[str]:
    """n small valid messages records."""
    return [
        json.dumps(
            {
                "messages": [
                    {"role": "user", "content": f"{i} + 1?"},
                    {"role": "assistant", "content": str(i + 1)},
                ]
            }
        )
        for i in range(n)
    ]


# --- the broken examples ----------------------------------------------------------------------


def test_every_bad_example_has_an_expected_problem():
    assert set(BAD_EXAMPLES) == set(EXPECTED_PROBLEMS)


@pytest.mark.parametrize("name", sorted(EXPECTED_PROBLEMS))
def test_bad_example_gets_its_problem_at_its_line(tmp_path, name):
    path = write(tmp_path, name, BAD_EXAMPLES[name])
    _, problems = validate_file(path)
    line, words = EXPECTED_PROBLEMS[name]
    assert len(problems) == 1, [str(p) for p in problems]
    problem = problems[0]
    assert (problem.file, problem.line) == (str(path), line)
    for word in words:
        assert word in problem.message
    assert one_sentence(problem.message)
    prefix = f"{path}:{line}: " if line is not None else f"{path}: "
    assert str(problem) == prefix + problem.message


@pytest.mark.parametrize("name", sorted(EXPECTED_PROBLEMS))
def test_convert_file_refuses_a_bad_example_naming_the_line(tmp_path, name):
    path = write(tmp_path, name, BAD_EXAMPLES[name])
    line, words = EXPECTED_PROBLEMS[name]
    with pytest.raises(ValueError, match="1 problem") as error:
        convert_file(path)
    where = f"{path}:{line}:" if line is not None else f"{path}:"
    assert where in str(error.value)
    assert words[0] in str(error.value)


def test_every_problem_is_reported_not_only_the_first(tmp_path):
    lines = chat_lines(12)
    lines[1] = "{not json"
    lines[4] = '{"messages": [{"role": "user", "content": "hi"}]}'
    lines[8] = '{"colour": "blue"}'
    lines[10] = '{"text": "a paragraph"}'
    path = write(tmp_path, "many.jsonl", "\n".join(lines) + "\n\n")
    shape, problems = validate_file(path)
    assert shape == "messages"
    assert [p.line for p in problems] == [2, 5, 9, 11]
    assert "no known shape" in problems[2].message and "'colour'" in problems[2].message
    assert "line 11 is text but the file is messages (line 1)" in problems[3].message
    with pytest.raises(ValueError) as error:
        convert_file(path)
    assert "4 problem(s)" in str(error.value)
    assert all(f"{path}:{n}:" in str(error.value) for n in (2, 5, 9, 11))


def test_convert_file_lists_only_the_first_few_problems(tmp_path):
    path = write(tmp_path, "bad.jsonl", "{oops\n" * 12)
    with pytest.raises(ValueError) as error:
        convert_file(path)
    assert f"... and {12 - own_data.PROBLEMS_SHOWN} more" in str(error.value)
    assert f"{path}:{own_data.PROBLEMS_SHOWN + 1}:" not in str(error.value)


def test_whole_file_problems(tmp_path):
    missing = tmp_path / "nowhere.jsonl"
    assert validate_file(missing) == (
        None,
        [Problem(str(missing), None, "does not exist; check the path and the current folder.")],
    )
    _, problems = validate_file(write(tmp_path, "empty.jsonl", "\n\n"))
    assert [(p.line, "no records" in p.message) for p in problems] == [(None, True)]
    _, problems = validate_file(write(tmp_path, "empty.json", "[]"))
    assert "no records" in problems[0].message
    _, problems = validate_file(write(tmp_path, "three.jsonl", "\n".join(chat_lines(3))))
    assert [p.message for p in problems] == [
        f"3 examples are not enough to split off a test set; add at least {MIN_EXAMPLES}."
    ]
    assert validate_file(tmp_path)[1] == [
        Problem(str(tmp_path), None, "is a folder; pass the data file inside it.")
    ]
    _, problems = validate_file(write(tmp_path, "data.csv", "a,b\n"))
    assert problems[0].line is None and ".jsonl" in problems[0].message
    path = tmp_path / "latin1.jsonl"
    path.write_bytes("\n".join(chat_lines(10)).replace("1?", "£?").encode("latin-1"))
    _, problems = validate_file(path)
    assert [p.message for p in problems] == ["the file is not UTF-8 text; save it as UTF-8."]


def test_a_given_shape_is_checked_against_every_record(tmp_path):
    path = write(tmp_path, "chat.jsonl", "\n".join(chat_lines(10)))
    shape, problems = validate_file(path, shape="alpaca")
    assert shape == "alpaca"
    assert len(problems) == 10
    assert "is messages but the file is alpaca (the shape you asked for)" in problems[0].message


# --- reading --------------------------------------------------------------------------------


def test_json_array_line_numbers(tmp_path):
    text = (
        "[\n"
        '  {"text": "one"}, {"text": "two"},\n'
        "\n"
        "  {\n"
        '    "text": "three, with a } and a [ and \\" in it"\n'
        "  }\n"
        '  ,{"text": "four"}\n'
        "]\n"
    )
    records = read_records(write(tmp_path, "a.json", text))
    assert [(line, r["text"][:5]) for line, r in records] == [
        (2, "one"),
        (2, "two"),
        (4, "three"),
        (7, "four"),
    ]


def test_bad_json_array_names_the_line(tmp_path):
    text = '[\n  {"text": "one"},\n  {"text": "two"}\n  {"text": "three"}\n]\n'
    path = write(tmp_path, "a.json", text)
    _, problems = validate_file(path)
    assert [(p.line, p.message.startswith("bad JSON")) for p in problems] == [(4, True)]


def test_a_json_file_must_hold_an_array(tmp_path):
    path = write(tmp_path, "a.json", '{"text": "one"}')
    _, problems = validate_file(path)
    assert problems[0].line == 1 and "array" in problems[0].message


def test_text_file_is_split_into_paragraphs_with_their_lines(tmp_path):
    path = write(tmp_path, "t.txt", "\n\nFirst line\nsecond line\n   \n\n  code\n\nlast\n")
    assert read_records(path) == [
        (3, {"text": "First line\nsecond line"}),
        (7, {"text": "  code"}),
        (9, {"text": "last"}),
    ]


def test_jsonl_keeps_line_numbers_and_turns_bad_lines_into_problems(tmp_path):
    path = write(tmp_path, "a.jsonl", '\n{"text": "a"}\n\n{bad\n{"text": "b"}\n')
    records = read_records(path)
    assert [line for line, _ in records] == [2, 4, 5]
    assert isinstance(records[1][1], Problem) and records[1][1].line == 4


# --- shapes ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("record", "shape"),
    [
        ({"messages": []}, "messages"),
        ({"instruction": "a", "output": "b"}, "alpaca"),
        ({"instruction": "a"}, "alpaca"),
        ({"prompt": "a", "completion": "b"}, "prompt_completion"),
        ({"prompt": "a"}, "prompt_completion"),
        ({"conversations": []}, "sharegpt"),
        ({"text": "a"}, "text"),
        ({"question": "a", "answer": "b"}, None),
        (["a list"], None),
        ("a string", None),
    ],
)
def test_detect_shape(record, shape):
    assert detect_shape(record) == shape


@pytest.mark.parametrize(
    ("record", "shape", "words"),
    [
        ({"prompt": "What is 2+2?"}, "prompt_completion", 'no "completion"'),
        ({"prompt": "What is 2+2?", "completion": ""}, "prompt_completion", "empty"),
        (
            {"prompt": "Q", "completion": ["A"]},
            "prompt_completion",
            "both be strings or both lists",
        ),
        (
            {
                "prompt": [{"role": "user", "content": "Q"}],
                "completion": [{"role": "user", "content": "A"}],
            },
            "prompt_completion",
            "assistant's message",
        ),
        ({"instruction": "Q", "output": "  "}, "alpaca", '"output" is empty'),
        ({"instruction": "", "output": "A"}, "alpaca", '"instruction" is empty'),
        ({"instruction": "Q", "input": 3, "output": "A"}, "alpaca", '"input" must be a string'),
        (
            {"conversations": [{"from": "human", "value": "Q"}, {"from": "bot", "value": "A"}]},
            "sharegpt",
            "turn 1 is from 'bot'",
        ),
        (
            {"conversations": [{"from": "human", "value": "Q"}, {"from": "gpt", "value": ""}]},
            "sharegpt",
            'turn 1 (gpt) has an empty "value"',
        ),
        ({"conversations": [{"from": "human", "value": "Q"}]}, "sharegpt", "no assistant turn"),
        (
            {
                "messages": [
                    {"role": "user", "content": "Q"},
                    {"role": "assistant", "content": "A"},
                    {"role": "user", "content": "Thanks"},
                ]
            },
            "messages",
            "ends with a user turn",
        ),
        ({"text": ""}, "text", '"text" is empty'),
        ({"text": "prose"}, "sharegpt", 'not a sharegpt record: it has no "conversations" key'),
        ({"output": "A"}, "messages", 'no "messages" key'),
        ("just a string", "text", "expected a JSON object, got str"),
    ],
)
def test_record_problems(record, shape, words):
    problem = own_data.record_problem(record, shape)
    assert problem is not None and words in problem
    with pytest.raises(ValueError, match="not valid"):
        to_conversational(record, shape)


def test_sharegpt_accepts_user_and_assistant_as_speakers():
    record = {
        "conversations": [
            {"from": "system", "value": "Be brief."},
            {"from": "user", "value": "Q"},
            {"from": "assistant", "value": "A"},
        ]
    }
    assert to_conversational(record, "sharegpt") == {
        "prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Q"}],
        "completion": [{"role": "assistant", "content": "A"}],
    }


def test_alpaca_input_joins_the_instruction():
    record = {"instruction": "Translate to French.", "input": "Good morning", "output": "Bonjour"}
    assert to_conversational(record, "alpaca") == {
        "prompt": [{"role": "user", "content": "Translate to French.\n\nGood morning"}],
        "completion": [{"role": "assistant", "content": "Bonjour"}],
    }


def test_string_prompt_completion_and_multi_turn_chats():
    assert to_conversational({"prompt": "Q", "completion": "A"}, "prompt_completion") == {
        "prompt": [{"role": "user", "content": "Q"}],
        "completion": [{"role": "assistant", "content": "A"}],
    }
    turns = ["Q1", "A1", "Q2", "A2"]
    messages = [
        {"role": role, "content": text}
        for role, text in zip(["user", "assistant"] * 2, turns, strict=True)
    ]
    converted = to_conversational({"messages": messages, "id": 7}, "messages")
    assert converted == {"prompt": messages[:3], "completion": messages[3:]}
    assert to_conversational({"text": "Some prose."}, "text") == {"text": "Some prose."}


# --- the shipped example files --------------------------------------------------------------


def test_example_files_cover_every_shape_and_are_small():
    assert tuple(EXAMPLE_FILES) == SHAPES
    for shape, path in EXAMPLE_FILES.items():
        assert path.is_file()
        assert path.stat().st_size < (40_000 if shape == "text" else 60_000)
    assert (own_data.OWN_DATA_DIR / "README.md").is_file()


@pytest.mark.parametrize("shape", SHAPES)
def test_example_file_validates_and_detects_its_shape(shape):
    assert validate_file(EXAMPLE_FILES[shape]) == (shape, [])
    assert validate_file(EXAMPLE_FILES[shape], shape=shape) == (shape, [])


@pytest.mark.parametrize("shape", CHAT_SHAPES)
def test_chat_example_files_convert_to_the_rentals_examples(shape):
    source = load_instruction_task("train")[:EXAMPLE_COUNT]
    converted = convert_file(EXAMPLE_FILES[shape])
    assert converted == [to_prompt_completion(example) for example in source]
    assert [r["completion"][0]["content"] for r in converted] == [
        reference_answer(e) for e in source
    ]


def test_text_example_file_is_the_python_reference():
    records = convert_file(EXAMPLE_FILES["text"])
    assert len(records) >= MIN_EXAMPLES
    text = own_data.python_reference_text()
    assert all(r["text"] in text for r in records)
    assert records[0]["text"].startswith('The "assert" statement')


def test_shipped_files_equal_what_the_generator_writes(tmp_path):
    written = write_example_files(tmp_path / "made")
    assert {shape: path.name for shape, path in written.items()} == {
        shape: path.name for shape, path in EXAMPLE_FILES.items()
    }
    for shape in CHAT_SHAPES:
        assert written[shape].read_bytes() == EXAMPLE_FILES[shape].read_bytes(), shape


@pytest.mark.skipif(
    sys.version_info[:2] != own_data.TEXT_PYTHON_VERSION,
    reason="the Python reference text varies a little between Python versions",
)
def test_shipped_text_file_equals_what_the_generator_writes(tmp_path):
    written = write_example_files(tmp_path)
    assert written["text"].read_bytes() == EXAMPLE_FILES["text"].read_bytes()


# --- bad arguments ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("call", "error"),
    [
        (lambda: validate_file(42), TypeError),
        (lambda: validate_file(None), TypeError),
        (lambda: read_records(["a.jsonl"]), TypeError),
        (lambda: convert_file(3.5), TypeError),
        (lambda: write_example_files(7), TypeError),
        (lambda: validate_file(EXAMPLE_FILES["messages"], shape="csv"), ValueError),
        (lambda: convert_file(EXAMPLE_FILES["messages"], shape="chatml"), ValueError),
        (lambda: to_conversational({"text": "a"}, "plain"), ValueError),
        (lambda: to_conversational({"text": "a"}, None), ValueError),
        (lambda: own_data.record_problem({"text": "a"}, "txt"), ValueError),
        (lambda: read_records(EXAMPLE_FILES["text"].with_name("missing.jsonl")), FileNotFoundError),
        (lambda: read_records(own_data.OWN_DATA_DIR / "README.md"), ValueError),
        (lambda: write_example_files(EXAMPLE_FILES["text"]), NotADirectoryError),
    ],
)
def test_bad_arguments_get_one_sentence_errors(call, error):
    with pytest.raises(error) as raised:
        call()
    assert one_sentence(str(raised.value)), str(raised.value)


def test_errors_name_what_to_pass():
    with pytest.raises(ValueError, match=re.escape(", ".join(SHAPES))):
        validate_file(EXAMPLE_FILES["messages"], shape="csv")
    with pytest.raises(TypeError, match="EXAMPLE_FILES"):
        validate_file(42)


# --- each shape trains ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lora_model_and_tokenizer():
    """SmolLM2 from the offline copy, loaded once, with a small LoRA adapter."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from course_utils import assets

    path = assets.model_path(source="offline", verbose=False)
    model = AutoModelForCausalLM.from_pretrained(path, dtype="float32")
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear"))
    return model, tokenizer


@pytest.mark.parametrize("shape", SHAPES)
def test_each_shape_trains_with_sft_trainer(shape, lora_model_and_tokenizer, tmp_path):
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    model, tokenizer = lora_model_and_tokenizer
    train_set = Dataset.from_list(convert_file(EXAMPLE_FILES[shape])[:4])
    config = SFTConfig(
        output_dir=str(tmp_path),
        max_steps=1,
        per_device_train_batch_size=2,
        max_length=256,
        learning_rate=1e-4,
        logging_steps=1,
        report_to="none",
        save_strategy="no",
        bf16=False,
        fp16=False,
        use_cpu=True,
        gradient_checkpointing=False,
        disable_tqdm=True,
    )
    trainer = SFTTrainer(
        model=model, args=config, train_dataset=train_set, processing_class=tokenizer
    )
    if shape != "text":  # the loss is on the answer only: the prompt's tokens carry no label
        batch = next(iter(trainer.get_train_dataloader()))
        labelled = (batch["labels"] != -100).sum(dim=1)
        assert bool(((labelled > 0) & (labelled < batch["attention_mask"].sum(dim=1))).all())
    result = trainer.train()
    assert trainer.state.global_step == 1
    assert math.isfinite(result.training_loss)
