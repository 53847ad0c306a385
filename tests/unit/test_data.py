"""course_utils.data: JSONL validation, assistant-only labels, blocks, packing, the three datasets."""

import json
import sys
from pathlib import Path

import pytest
import torch

from course_tools import datasets
from course_utils import data

CONVERSATION = [
    {"role": "system", "content": "Answer briefly."},
    {"role": "user", "content": "What is 2 + 2?"},
    {"role": "assistant", "content": "4"},
    {"role": "user", "content": "And 3 + 3?"},
    {"role": "assistant", "content": "It is 6."},
]


def good_line(user: str = "Hi", answer: str = "Hello") -> str:
    return json.dumps(
        {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]}
    )


# --- the file format ---------------------------------------------------------------------------


def write_lines(tmp_path: Path, lines: list[str]) -> Path:
    path = tmp_path / "chat.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_read_jsonl_round_trips_what_write_jsonl_wrote(tmp_path):
    examples = [json.loads(good_line("Hi", "Hello")), json.loads(good_line("£5?", "Five pounds"))]
    path = data.write_jsonl(tmp_path / "sub" / "out.jsonl", examples)
    assert data.read_jsonl(path) == examples
    assert "£" in path.read_text(encoding="utf-8")  # written as UTF-8, not \u escapes


@pytest.mark.parametrize(
    ("bad_line", "problem"),
    [
        ('{"messages": [{"role": "user", "content": "Hi"}', "bad JSON"),
        ('{"text": "Hi"}', 'missing the "messages" key'),
        ('{"messages": [{"role": "user", "content": "Hi"}]}', "no assistant turn"),
        (
            '{"messages": [{"role": "human", "content": "Hi"}, '
            '{"role": "assistant", "content": "Hello"}]}',
            "role 'human'",
        ),
        (
            '{"messages": [{"role": "user", "content": "  "}, '
            '{"role": "assistant", "content": "Hello"}]}',
            "empty content",
        ),
        ('{"messages": []}', "non-empty list"),
        (
            '{"messages": [{"role": "user", "content": "Hi"}, {"role": "system", "content": "S"}, '
            '{"role": "assistant", "content": "Hello"}]}',
            "only the first message",
        ),
    ],
)
def test_a_malformed_line_is_reported_with_file_line_and_problem(tmp_path, bad_line, problem):
    path = write_lines(tmp_path, [good_line(), good_line(), bad_line, good_line()])
    with pytest.raises(data.JSONLFormatError) as caught:
        data.read_jsonl(path)
    message = str(caught.value)
    assert str(path) in message and "line 3" in message and problem in message
    assert isinstance(caught.value, ValueError)


def test_blank_lines_are_skipped_and_missing_files_named(tmp_path):
    path = write_lines(tmp_path, [good_line(), "", good_line()])
    assert len(data.read_jsonl(path)) == 2
    with pytest.raises(FileNotFoundError, match="write_jsonl"):
        data.read_jsonl(tmp_path / "absent.jsonl")


def test_write_jsonl_refuses_invalid_examples(tmp_path):
    with pytest.raises(data.JSONLFormatError, match="example 1: no assistant turn"):
        data.write_jsonl(
            tmp_path / "x.jsonl",
            [json.loads(good_line()), {"messages": [{"role": "user", "content": "Hi"}]}],
        )
    with pytest.raises(TypeError):
        data.write_jsonl(tmp_path / "x.jsonl", {"messages": []})
    assert not (tmp_path / "x.jsonl").exists()


def test_prompt_and_reference_split_the_last_assistant_turn():
    example = {"messages": CONVERSATION}
    assert data.prompt_messages(example) == CONVERSATION[:4]
    assert data.reference_answer(example) == "It is 6."


# --- chat template and assistant-only labels ---------------------------------------------------


def unmasked_text(tokenizer, feature) -> list[str]:
    """Decode each run of consecutive unmasked labels separately."""
    runs, current = [], []
    for label in feature["labels"]:
        if label == data.IGNORE_INDEX:
            if current:
                runs.append(current)
            current = []
        else:
            current.append(label)
    if current:
        runs.append(current)
    return [tokenizer.decode(run) for run in runs]


@pytest.mark.parametrize(
    "messages",
    [
        CONVERSATION,
        CONVERSATION[1:3],  # no system message: the template inserts its default one
        data.load_instruction_task("test")[0]["messages"],
        data.load_classification_task("test")[0]["messages"],
        [
            {"role": "user", "content": "Say something with inner space."},
            {"role": "assistant", "content": "A newline\nin the middle and a space at the end "},
        ],
    ],
)
def test_only_the_assistant_answers_and_their_end_token_are_labelled(tokenizer, messages):
    feature = data.tokenize_with_assistant_mask(tokenizer, messages)
    answers = [m["content"] for m in messages if m["role"] == "assistant"]
    assert unmasked_text(tokenizer, feature) == [a + "<|im_end|>" for a in answers]
    text = data.apply_template(tokenizer, messages)
    assert feature["input_ids"] == tokenizer(text, add_special_tokens=False)["input_ids"]
    kept = [i for i, label in enumerate(feature["labels"]) if label != data.IGNORE_INDEX]
    assert all(feature["labels"][i] == feature["input_ids"][i] for i in kept)
    assert len(feature["attention_mask"]) == len(feature["input_ids"])


def test_a_token_straddling_the_start_of_an_answer_counts_as_the_answers(tokenizer):
    """An answer starting with a space merges with the header's newline into one token."""
    messages = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "  two leading spaces"},
    ]
    feature = data.tokenize_with_assistant_mask(tokenizer, messages)
    assert unmasked_text(tokenizer, feature) == ["\n  two leading spaces<|im_end|>"]


def test_the_mask_agrees_with_transformers_on_a_template_with_generation_tags(tokenizer):
    assert not data.template_supports_assistant_mask(tokenizer), "SmolLM2's ChatML has no tags"
    with pytest.raises(ValueError, match="generation"):
        data.hf_assistant_mask(tokenizer, CONVERSATION)
    original = tokenizer.chat_template
    try:
        tokenizer.chat_template = data.with_generation_tags(original)
        assert data.template_supports_assistant_mask(tokenizer)
        for messages in (CONVERSATION, data.load_instruction_task("train")[3]["messages"]):
            ours = data.tokenize_with_assistant_mask(tokenizer, messages)
            theirs = data.hf_assistant_mask(tokenizer, messages)
            assert [int(label != data.IGNORE_INDEX) for label in ours["labels"]] == theirs
            assert sum(theirs) > 0
    finally:
        tokenizer.chat_template = original


def test_truncation_keeps_lengths_and_refuses_to_drop_every_answer_token(tokenizer):
    full = data.tokenize_with_assistant_mask(tokenizer, CONVERSATION)
    cut = data.tokenize_with_assistant_mask(
        tokenizer, CONVERSATION, max_length=len(full["labels"]) - 3
    )
    assert cut["input_ids"] == full["input_ids"][:-3] and cut["labels"] == full["labels"][:-3]
    with pytest.raises(ValueError, match="no assistant token is left"):
        data.tokenize_with_assistant_mask(tokenizer, CONVERSATION, max_length=5)
    with pytest.raises(ValueError, match="no assistant turn"):
        data.tokenize_with_assistant_mask(tokenizer, CONVERSATION[:2])
    with pytest.raises(ValueError, match="max_length"):
        data.tokenize_with_assistant_mask(tokenizer, CONVERSATION, max_length=0)


# --- batches: padding and packing --------------------------------------------------------------


def test_pad_batch_pads_labels_with_minus_100_and_masks_attention():
    features = [
        {"input_ids": [5, 6, 7], "attention_mask": [1, 1, 1], "labels": [-100, 6, 7]},
        {"input_ids": [8], "attention_mask": [1], "labels": [8]},
    ]
    right = data.pad_batch(features, pad_token_id=0)
    assert right["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert right["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert right["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    left = data.make_collator(0, padding_side="left")(features)
    assert left["input_ids"].tolist() == [[5, 6, 7], [0, 0, 8]]
    with pytest.raises(ValueError, match="padding_side"):
        data.pad_batch(features, 0, padding_side="middle")
    with pytest.raises(TypeError, match="tokenize_with_assistant_mask"):
        data.pad_batch([{"input_ids": [1]}], 0)


def test_pack_examples_fills_rows_in_order_and_restarts_positions():
    features = [{"input_ids": [i] * n, "labels": [i] * n} for i, n in enumerate([3, 4, 2, 5], 1)]
    rows = data.pack_examples(features, max_length=7)
    assert [row["input_ids"] for row in rows] == [[1, 1, 1, 2, 2, 2, 2], [3, 3, 4, 4, 4, 4, 4]]
    assert rows[0]["position_ids"] == [0, 1, 2, 0, 1, 2, 3]
    batch = data.pad_batch(data.pack_examples(features, max_length=8), pad_token_id=0)
    assert "attention_mask" not in batch and batch["position_ids"].shape == batch["input_ids"].shape
    with pytest.raises(ValueError, match="more than max_length"):
        data.pack_examples(features, max_length=4)


def test_packed_examples_do_not_see_each_other(model, tokenizer):
    """transformers reads restarting position_ids as separate sequences: logits match unpacked."""
    examples = data.load_instruction_task("train")[:2]
    features = [data.tokenize_with_assistant_mask(tokenizer, e) for e in examples]
    packed = data.pad_batch(data.pack_examples(features, max_length=1024), tokenizer.pad_token_id)
    with torch.no_grad():
        together = model(**without_labels(packed), use_cache=False).logits
        leaky = model(**without_labels(packed)).logits  # a cache in the way: one causal mask
        second = torch.tensor([features[1]["input_ids"]])
        alone = model(input_ids=second).logits
    start = len(features[0]["input_ids"])
    torch.testing.assert_close(together[0, start:], alone[0], atol=1e-3, rtol=1e-3)
    assert (leaky[0, start:] - alone[0]).abs().max() > 1.0, "the default call should leak"


def without_labels(batch: dict) -> dict:
    return {key: value for key, value in batch.items() if key != "labels"}


# --- causal LM blocks --------------------------------------------------------------------------


def test_group_texts_cuts_full_blocks_with_labels_equal_to_inputs():
    blocks = data.group_texts([[1, 2, 3], [4, 5, 6, 7], [8]], block_size=3)
    assert blocks["input_ids"] == [[1, 2, 3], [4, 5, 6]]  # the partial block [7, 8] is dropped
    assert (
        blocks["labels"] == blocks["input_ids"]
        and blocks["labels"][0] is not blocks["input_ids"][0]
    )
    assert blocks["attention_mask"] == [[1, 1, 1], [1, 1, 1]]
    with_sep = data.group_texts([[1, 2], [3, 4]], block_size=3, separator_id=0)
    assert with_sep["input_ids"] == [[1, 2, 0], [3, 4, 0]]


def test_group_texts_refuses_text_shorter_than_one_block():
    with pytest.raises(ValueError, match="shorter than one block of 8"):
        data.group_texts([[1, 2, 3], [4]], block_size=8)
    with pytest.raises(ValueError, match="block_size"):
        data.group_texts([[1, 2, 3]], block_size=1)
    with pytest.raises(TypeError, match="not text"):
        data.group_texts(["some text"], block_size=2)


def test_text_block_dataset_is_the_texts_tokens_in_full_blocks_with_an_end_token(tokenizer):
    texts = ["def f(x):\n    return x", "class A:\n    pass"]
    rows = data.text_block_dataset(tokenizer, texts, block_size=4)
    stream = []
    for text in texts:
        stream += tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert rows["input_ids"] == [stream[i : i + 4] for i in range(0, len(stream) - 3, 4)]
    assert rows["labels"] == rows["input_ids"]
    with pytest.raises(ValueError, match="list of strings"):
        data.text_block_dataset(tokenizer, "one string", block_size=4)


def test_python_reference_is_split_by_topic_without_overlap():
    train = data.python_reference_topics("train")
    held_out = data.python_reference_topics("validation")
    assert train and held_out and not set(train) & set(held_out)
    assert set(train) | set(held_out) == set(data.python_reference_topics("all"))
    assert data.load_python_reference("validation") == list(held_out.values())
    share = sum(map(len, held_out.values())) / sum(map(len, train.values()))
    assert 0.03 < share < 0.3, share
    with pytest.raises(ValueError, match="split"):
        data.load_python_reference("test")


# --- splits ------------------------------------------------------------------------------------


def test_train_validation_split_is_deterministic_and_disjoint():
    items = list(range(100))
    train, validation = data.train_validation_split(items, 0.2, seed=3)
    assert len(train) == 80 and len(validation) == 20
    assert sorted(train + validation) == items
    assert data.train_validation_split(items, 0.2, seed=3) == (train, validation)
    assert data.train_validation_split(items, 0.2, seed=4)[1] != validation
    for fraction in (0, 1, 1.5):
        with pytest.raises(ValueError, match="fraction"):
            data.train_validation_split(items, fraction)
    with pytest.raises(ValueError, match="leaves one side empty"):
        data.train_validation_split([1, 2], 0.1)


# --- the datasets ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("loader", "sizes"),
    [
        (data.load_instruction_task, {"train": 400, "validation": 50, "test": 100}),
        (data.load_classification_task, {"train": 336, "validation": 48, "test": 96}),
    ],
)
def test_shipped_splits_have_their_sizes_and_never_overlap(loader, sizes):
    splits = {split: loader(split) for split in data.SPLITS}
    assert {split: len(examples) for split, examples in splits.items()} == sizes
    users = {
        split: {data.prompt_messages(e)[-1]["content"].lower() for e in examples}
        for split, examples in splits.items()
    }
    assert all(len(users[s]) == sizes[s] for s in data.SPLITS), "duplicates inside a split"
    assert not users["train"] & users["test"]
    assert not users["train"] & users["validation"]
    assert not users["validation"] & users["test"]
    with pytest.raises(ValueError, match="split"):
        loader("dev")


def test_the_instruction_task_is_regenerated_byte_for_byte(tmp_path):
    for split, examples in datasets.build_instruction_task().items():
        fresh = data.write_jsonl(tmp_path / f"rentals_{split}.jsonl", examples)
        assert fresh.read_bytes() == (data.DATA_DIR / fresh.name).read_bytes(), split
    assert datasets.build_instruction_task(seed=1)["test"] != data.load_instruction_task("test")


def test_the_classification_task_is_regenerated_byte_for_byte(tmp_path):
    manifest = json.loads((data.DATA_DIR / data.MANIFEST).read_text())
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    if manifest["stdlib_docs_python"] != version:
        pytest.skip(
            f"docstrings differ between Pythons: built with {manifest['stdlib_docs_python']}"
        )
    for split, examples in datasets.build_classification_task().items():
        fresh = data.write_jsonl(tmp_path / f"stdlib_docs_{split}.jsonl", examples)
        assert fresh.read_bytes() == (data.DATA_DIR / fresh.name).read_bytes(), split


def test_the_manifest_matches_the_shipped_files():
    manifest = json.loads((data.DATA_DIR / data.MANIFEST).read_text())
    for name, info in manifest["files"].items():
        assert datasets.file_digest(data.DATA_DIR / name) == info["sha256"], name


def test_instruction_records_follow_the_documented_rules():
    for example in data.load_instruction_task("train"):
        listing = data.prompt_messages(example)[-1]["content"]
        record = json.loads(data.reference_answer(example))
        assert list(record) == ["bedrooms", "type", "city", "rent_gbp", "rent_period"]
        assert record["type"] in data.PROPERTY_TYPES and record["city"] in data.UK_CITIES
        assert record["city"].lower() in listing.lower()
        assert (record["bedrooms"] == 0) == (record["type"] == "studio")
        assert record["rent_period"] in ("month", "week")
        assert str(record["rent_gbp"]) in listing.replace(",", "")


def test_classification_labels_are_balanced_and_from_the_label_set():
    for split, per_label in datasets.CLASSIFICATION_PER_LABEL.items():
        labels = [data.reference_answer(e) for e in data.load_classification_task(split)]
        assert {label: labels.count(label) for label in set(labels)} == dict.fromkeys(
            data.CLASSIFICATION_LABELS, per_label
        )


# --- metrics -----------------------------------------------------------------------------------


def test_exact_match_compares_parsed_objects():
    reference = '{"bedrooms": 3, "type": "flat", "city": "Leeds", "rent_gbp": 950}'
    assert data.exact_match(
        ' {"city": "Leeds", "rent_gbp": 950, "bedrooms": 3, "type": "flat"}\n', reference
    )
    assert not data.exact_match(
        '{"bedrooms": "3", "type": "flat", "city": "Leeds", "rent_gbp": 950}', reference
    )
    assert not data.exact_match('{"bedrooms": 3, "type": "flat", "city": "Leeds"}', reference)
    assert not data.exact_match("not json at all", reference)
    wrapped = 'Here it is: {"bedrooms": 3, "type": "flat", "city": "Leeds", "rent_gbp": 950} Done.'
    assert not data.exact_match(wrapped, reference)
    assert data.exact_match(wrapped, reference, strict=False)
    with pytest.raises(ValueError, match="reference"):
        data.exact_match("{}", "nope")


def test_label_from_answer_reads_the_first_label_named():
    assert data.label_from_answer("Numeric.") == "numeric"
    assert data.label_from_answer("It is markup, not compression") == "markup"
    assert data.label_from_answer("I cannot tell") is None
