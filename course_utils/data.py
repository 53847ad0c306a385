"""Data for fine-tuning: JSONL chat messages, chat templates, assistant-only labels, blocks, splits.

Lesson 04 reads this module top to bottom. It holds

- the **file format**: one JSON object per line, ``{"messages": [{"role": ..., "content": ...}]}``,
  checked line by line (`read_jsonl`, `write_jsonl`);
- the **chat template** step and the **labels**: `tokenize_with_assistant_mask` puts -100 on every
  prompt token, so that only the assistant's tokens (and its closing ``<|im_end|>``) count in the
  loss;
- **batching**: `pad_batch` (padding) and `pack_examples` (packing several examples in one row);
- **causal LM** data: `group_texts` cuts a token stream into fixed blocks (labels = input_ids);
- the course's **three datasets**, all made by code in this file from licence-clean sources and
  shipped as JSONL in ``course_utils/data/`` (see DATA_CARD.md there):

  1. ``rentals``: a rental listing sentence -> strict JSON (`load_instruction_task`);
  2. the Python reference text of the standard library, ``pydoc_data.topics``
     (`load_python_reference`), for domain adaptation;
  3. ``stdlib_docs``: a standard-library docstring -> its documentation section
     (`load_classification_task`).

Regenerate the shipped files with ``python -m course_tools.datasets --write`` (``--check`` compares).
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from pydoc_data.topics import topics
from typing import Any

import torch
from datasets import Dataset

from course_utils.generation import generate_batch

DATA_DIR = Path(__file__).resolve().parent / "data"
ROLES = ("system", "user", "assistant")
IGNORE_INDEX = -100  # the label value that torch's cross-entropy (and every HF model) skips
SPLITS = ("train", "validation", "test")
SEED = 0
MANIFEST = "datasets_manifest.json"
#: Tokens a generated answer may run past the longest reference (the end-of-turn token, spaces).
ANSWER_SLACK = 8

Message = dict[str, str]
Example = dict[str, Any]


class JSONLFormatError(ValueError):
    """A line of a JSONL chat file is malformed; the message names the file, line and problem."""


# ---------------------------------------------------------------------------------------------
# 1. The file format: JSONL, one conversation per line.
# ---------------------------------------------------------------------------------------------


def message_problem(example: object) -> str | None:
    """Return what is wrong with one chat example (a dict with "messages"), or None if it is valid."""
    if not isinstance(example, dict):
        return f"expected a JSON object, got {type(example).__name__}"
    if "messages" not in example:
        return 'missing the "messages" key'
    messages = example["messages"]
    if not isinstance(messages, list) or not messages:
        return '"messages" must be a non-empty list of {"role": ..., "content": ...} objects'
    for index, message in enumerate(messages):
        if not isinstance(message, dict):
            return f"message {index} is a {type(message).__name__}, not an object"
        role = message.get("role")
        if role not in ROLES:
            return f"message {index} has role {role!r}; a role must be one of {', '.join(ROLES)}"
        content = message.get("content")
        if not isinstance(content, str):
            return f'message {index} ({role}) has no "content" string'
        if not content.strip():
            return f"message {index} ({role}) has empty content"
        if role == "system" and index != 0:
            return f"message {index} is a system message; only the first message may be one"
    if not any(m["role"] == "assistant" for m in messages):
        return "no assistant turn: there is nothing for the model to learn from this example"
    return None


def validate_example(example: object, where: str = "example") -> Example:
    """Return `example` if it is a valid chat example, else raise JSONLFormatError saying why."""
    problem = message_problem(example)
    if problem is not None:
        raise JSONLFormatError(
            f"{where}: {problem}. Each example must look like "
            '{"messages": [{"role": "user", "content": "..."}, '
            '{"role": "assistant", "content": "..."}]}.'
        )
    return example  # type: ignore[return-value]


def read_jsonl(path: str | Path) -> list[Example]:
    """Read a JSONL chat file, checking every line; a bad line raises naming file, line and problem."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} does not exist; check the path or write it with write_jsonl."
        )
    return [
        validate_example(example, where=f"{path}, line {number}")
        for number, example in json_lines(path)
    ]


def json_lines(path: str | Path) -> Iterator[tuple[int, Any]]:
    """Yield (line number, parsed object) of a JSONL file; a line that is not JSON raises."""
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue  # blank lines (a trailing newline, say) carry nothing
            try:
                yield number, json.loads(line)
            except json.JSONDecodeError as error:
                raise JSONLFormatError(
                    f"{path}, line {number}: bad JSON ({error.msg} at column {error.colno}). "
                    "Fix that line: each line must be one complete JSON object."
                ) from None


def write_json_lines(path: str | Path, rows: Sequence[Any]) -> Path:
    """Write already checked rows to `path`, one JSON object per line (UTF-8, \\n endings)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="\n") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    return path


def write_jsonl(path: str | Path, examples: Sequence[Example]) -> Path:
    """Write chat examples to `path`, one JSON object per line (UTF-8), after validating each one."""
    if isinstance(examples, dict | str) or not isinstance(examples, Sequence):
        raise TypeError("examples must be a list of {'messages': [...]} dicts.")
    for index, example in enumerate(examples):
        validate_example(example, where=f"example {index}")
    return write_json_lines(path, examples)


def prompt_messages(example: Example) -> list[Message]:
    """Return the conversation up to (without) its last assistant turn: what the model is shown."""
    messages = validate_example(example)["messages"]
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    return [dict(m) for m in messages[:last]]


def reference_answer(example: Example) -> str:
    """Return the content of the example's last assistant turn: the answer the model should give."""
    messages = validate_example(example)["messages"]
    return [m for m in messages if m["role"] == "assistant"][-1]["content"]


def to_prompt_completion(example: Example) -> dict[str, list[Message]]:
    """Split a chat example into TRL's conversational prompt/completion format (lab 05).

    ``SFTTrainer`` puts labels on the completion only (its ``completion_only_loss``), so the
    model learns the answer, not the system message and the listing.
    """
    messages = validate_example(example)["messages"]
    return {"prompt": messages[:-1], "completion": messages[-1:]}


def prompt_completion_dataset(examples: Sequence[Example]):
    """Return chat examples as a ``datasets.Dataset`` of prompt/completion rows for SFTTrainer."""
    if isinstance(examples, dict | str) or not isinstance(examples, Sequence) or not examples:
        raise ValueError(
            "examples must be a non-empty list of chat examples, e.g. "
            "data.load_instruction_task('train')."
        )
    for index, example in enumerate(examples):
        if (
            validate_example(example, where=f"example {index}")["messages"][-1]["role"]
            != "assistant"
        ):
            raise ValueError(
                f"example {index} does not end with the assistant's answer; "
                "the last message is what the model learns to write."
            )
    return Dataset.from_list([to_prompt_completion(e) for e in examples])


# ---------------------------------------------------------------------------------------------
# 2. Chat templates and assistant-only labels.
# ---------------------------------------------------------------------------------------------


def _messages_of(messages: Sequence[Message] | Example) -> list[Message]:
    """Accept a list of messages or a {"messages": [...]} example and return the checked list."""
    if isinstance(messages, dict):
        messages = messages.get("messages")  # type: ignore[assignment]
    if not isinstance(messages, list):
        raise TypeError('messages must be a list of {"role": ..., "content": ...} dicts.')
    problem = message_problem({"messages": messages})
    if problem is not None and not problem.startswith("no assistant turn"):
        raise ValueError(f"{problem}; fix the conversation before applying the chat template.")
    return messages


def apply_template(
    tokenizer, messages: Sequence[Message] | Example, add_generation_prompt: bool = False
) -> str:
    """Return the conversation written out by the tokenizer's chat template, as text."""
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError("This tokenizer has no chat template; load the course tokenizer instead.")
    return tokenizer.apply_chat_template(
        _messages_of(messages), tokenize=False, add_generation_prompt=add_generation_prompt
    )


def template_supports_assistant_mask(tokenizer) -> bool:
    """Say whether the chat template marks assistant text with {% generation %} (HF's mask needs it)."""
    template = getattr(tokenizer, "chat_template", None) or ""
    return re.search(r"\{%-?\s*generation\s*-?%\}", template) is not None


def answer_spans(tokenizer, messages: list[dict]) -> list[tuple[int, int]]:
    """The (start, end) characters of each assistant answer and its <|im_end|> in the chat text."""
    full = apply_template(tokenizer, messages)
    spans = []
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = apply_template(tokenizer, messages[:index], add_generation_prompt=True)
        through = apply_template(tokenizer, messages[: index + 1])
        if not (full.startswith(before) and full.startswith(through)):
            raise ValueError(
                "This chat template rewrites earlier turns when a turn is added, so prompt and "
                "answer cannot be told apart by prefixes; use a template such as ChatML."
            )
        # The turn ends with the answer, <|im_end|> and a newline; the newline is layout.
        spans.append((len(before), len(through.rstrip())))
    return spans


def assistant_only_labels(tokenizer, messages: list[dict]) -> dict[str, list[int]]:
    """Token ids of the conversation; labels copy the answers' tokens and are -100 elsewhere."""
    text = apply_template(tokenizer, messages)
    spans = answer_spans(tokenizer, messages)
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    input_ids = list(encoded["input_ids"])
    labels = [IGNORE_INDEX] * len(input_ids)
    for position, (start, end) in enumerate(encoded["offset_mapping"]):
        # A token that straddles the edge of an answer (rare: an answer starting with a space
        # can merge with the newline before it) counts as the answer's, as in transformers.
        if any(start < e and end > s for s, e in spans):
            labels[position] = input_ids[position]
    return {"input_ids": input_ids, "attention_mask": [1] * len(input_ids), "labels": labels}


def assistant_spans(tokenizer, messages: Sequence[Message] | Example) -> list[tuple[int, int]]:
    """Return the (start, end) character spans of each assistant answer + its closing token."""
    return answer_spans(tokenizer, _messages_of(messages))


def tokenize_with_assistant_mask(
    tokenizer, messages: Sequence[Message] | Example, max_length: int | None = None
) -> dict[str, list[int]]:
    """Tokenize a conversation; labels copy the assistant tokens (incl. <|im_end|>), -100 elsewhere.

    The checked form of `assistant_only_labels` (lesson 04 writes it, and `answer_spans`, in its
    own cells), with an optional truncation to `max_length` tokens.
    """
    if max_length is not None and (
        isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 2
    ):
        raise ValueError(f"max_length must be an integer >= 2 or None (got {max_length!r}).")
    messages = _messages_of(messages)
    if not any(m["role"] == "assistant" for m in messages):
        raise ValueError("The conversation has no assistant turn; add the answer to learn.")
    feature = assistant_only_labels(tokenizer, messages)
    if max_length is not None and len(feature["input_ids"]) > max_length:
        feature = {key: values[:max_length] for key, values in feature.items()}
        if all(label == IGNORE_INDEX for label in feature["labels"]):
            raise ValueError(
                f"After truncation to max_length={max_length} no assistant token is left; "
                "raise max_length or shorten the prompt."
            )
    return feature


def hf_assistant_mask(tokenizer, messages: Sequence[Message] | Example) -> list[int]:
    """Return transformers' own assistant mask (needs a template with {% generation %} tags)."""
    if not template_supports_assistant_mask(tokenizer):
        raise ValueError(
            "This chat template has no {% generation %} tags, so transformers cannot mark the "
            "assistant tokens; use tokenize_with_assistant_mask (or a template with the tags)."
        )
    out = tokenizer.apply_chat_template(
        _messages_of(messages), tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )
    return list(out["assistant_masks"])


def with_generation_tags(chat_template: str) -> str:
    """Return a ChatML template with {% generation %} around each assistant answer and <|im_end|>.

    The text it writes is unchanged; only transformers' assistant mask can now see the answers.
    """
    if not isinstance(chat_template, str) or "<|im_start|>" not in chat_template:
        raise ValueError("Pass a ChatML chat template (one that writes <|im_start|> turns).")
    newline = r"'(?:\n|\\n)'"  # a newline in the template: a real one or an escaped one
    turn = re.compile(
        r"\{\{\s*'<\|im_start\|>' \+ message\['role'\] \+ (?P<nl>" + newline + r") \+ "
        r"message\['content'\] \+ '<\|im_end\|>' \+ " + newline + r"\s*\}\}"
    )
    match = turn.search(chat_template)
    if match is None:
        raise ValueError("This template does not write turns the way SmolLM2's ChatML does.")
    nl = match.group("nl")
    tagged = (
        "{% if message['role'] == 'assistant' %}"
        f"{{{{ '<|im_start|>assistant' + {nl} }}}}"
        "{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}"
        f"{{{{ {nl} }}}}{{% else %}}{match.group(0)}{{% endif %}}"
    )
    return chat_template[: match.start()] + tagged + chat_template[match.end() :]


# ---------------------------------------------------------------------------------------------
# 3. Batches: padding and packing.
# ---------------------------------------------------------------------------------------------


def _check_features(features: Sequence[dict]) -> None:
    """Raise if `features` is not a non-empty list of dicts with input_ids and labels lists."""
    if isinstance(features, dict) or not isinstance(features, Sequence) or not features:
        raise TypeError(
            "features must be a non-empty list of dicts from tokenize_with_assistant_mask."
        )
    for index, feature in enumerate(features):
        if not isinstance(feature, dict) or "input_ids" not in feature or "labels" not in feature:
            raise TypeError(
                f"feature {index} needs 'input_ids' and 'labels'; build it with "
                "tokenize_with_assistant_mask."
            )
        if len(feature["input_ids"]) != len(feature["labels"]):
            raise ValueError(f"feature {index}: input_ids and labels differ in length; rebuild it.")


def pad_batch(
    features: Sequence[dict], pad_token_id: int, padding_side: str = "right"
) -> dict[str, torch.Tensor]:
    """Pad features to the longest one and stack them: labels padded with -100, attention 0.

    Packed features (with ``position_ids``, from `pack_examples`) get no attention mask: positions
    restarting at 0 tell transformers where each packed sequence (and the padding) starts, and it
    then keeps them from attending to one another. It only looks when there is no attention mask
    and no cache: call the model with ``use_cache=False`` (training needs no cache anyway).
    """
    _check_features(features)
    if isinstance(pad_token_id, bool) or not isinstance(pad_token_id, int) or pad_token_id < 0:
        raise ValueError(f"pad_token_id must be a token id >= 0 (got {pad_token_id!r}).")
    if padding_side not in ("right", "left"):
        raise ValueError(f"padding_side must be 'right' or 'left' (got {padding_side!r}).")
    packed = all("position_ids" in f for f in features)
    width = max(len(f["input_ids"]) for f in features)
    rows: dict[str, list[list[int]]] = {"input_ids": [], "labels": []}
    rows["position_ids" if packed else "attention_mask"] = []
    for feature in features:
        n = width - len(feature["input_ids"])
        parts = {
            "input_ids": (list(feature["input_ids"]), [pad_token_id] * n),
            "labels": (list(feature["labels"]), [IGNORE_INDEX] * n),
        }
        if packed:
            parts["position_ids"] = (list(feature["position_ids"]), list(range(n)))
        else:
            mask = list(feature.get("attention_mask", [1] * len(feature["input_ids"])))
            parts["attention_mask"] = (mask, [0] * n)
        for key, (values, pad) in parts.items():
            rows[key].append(values + pad if padding_side == "right" else pad + values)
    return {key: torch.tensor(value, dtype=torch.long) for key, value in rows.items()}


def make_collator(pad_token_id: int, padding_side: str = "right") -> Callable:
    """Return a collate_fn for torch's DataLoader that pads with `pad_batch`."""
    pad_batch([{"input_ids": [0], "labels": [0]}], pad_token_id, padding_side)  # check arguments

    def collate(features: Sequence[dict]) -> dict[str, torch.Tensor]:
        """Pad one batch of features."""
        return pad_batch(features, pad_token_id, padding_side)

    return collate


def pack_examples(features: Sequence[dict], max_length: int) -> list[dict[str, list[int]]]:
    """Pack features, in order, into rows of at most `max_length` tokens (positions restart per example).

    Batch the rows with `pad_batch` and call the model with ``use_cache=False``: transformers then
    reads the restarting position_ids and keeps packed examples from attending to one another.
    """
    _check_features(features)
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1:
        raise ValueError(f"max_length must be a positive integer (got {max_length!r}).")
    rows: list[dict[str, list[int]]] = []
    current: dict[str, list[int]] = {"input_ids": [], "labels": [], "position_ids": []}
    for index, feature in enumerate(features):
        n = len(feature["input_ids"])
        if n > max_length:
            raise ValueError(
                f"feature {index} has {n} tokens, more than max_length={max_length}; raise "
                "max_length or truncate the example with tokenize_with_assistant_mask(max_length=...)."
            )
        if current["input_ids"] and len(current["input_ids"]) + n > max_length:
            rows.append(current)
            current = {"input_ids": [], "labels": [], "position_ids": []}
        current["input_ids"] += list(feature["input_ids"])
        current["labels"] += list(feature["labels"])
        current["position_ids"] += list(range(n))
    rows.append(current)
    return rows


# ---------------------------------------------------------------------------------------------
# 4. Causal language modelling: a corpus cut into blocks.
# ---------------------------------------------------------------------------------------------


def _topic_is_held_out(topic: str) -> bool:
    """Put a topic in the held-out split when its SHA-256 is 0 mod 10 (about a tenth of topics)."""
    return int(hashlib.sha256(topic.encode()).hexdigest(), 16) % 10 == 0


def python_reference_topics(split: str = "train") -> dict[str, str]:
    """Return {topic: text} of the Python reference in pydoc_data.topics for one split."""
    if split not in ("train", "validation", "all"):
        raise ValueError(f"split must be 'train', 'validation' or 'all' (got {split!r}).")

    return {
        name: topics[name]
        for name in sorted(topics)
        if split == "all" or _topic_is_held_out(name) == (split == "validation")
    }


def load_python_reference(split: str = "train") -> list[str]:
    """Return the texts of the Python language reference (PSF licence), split by topic."""
    return list(python_reference_topics(split).values())


def cut_into_blocks(
    token_ids_list: list[list[int]], block_size: int, separator_id: int | None = None
) -> dict[str, list[list[int]]]:
    """One stream of all the token lists (a separator after each), cut into full blocks."""
    stream = []
    for ids in token_ids_list:
        stream.extend(ids)
        if separator_id is not None:
            stream.append(separator_id)
    n_blocks = len(stream) // block_size  # the last, partial block is dropped
    blocks = [stream[i * block_size : (i + 1) * block_size] for i in range(n_blocks)]
    return {
        "input_ids": blocks,
        "attention_mask": [[1] * block_size for _ in blocks],
        "labels": [list(block) for block in blocks],  # the model shifts them inside its loss
    }


def group_texts(
    token_ids_list: Sequence[Sequence[int]], block_size: int, separator_id: int | None = None
) -> dict[str, list[list[int]]]:
    """Concatenate token lists (with an optional separator after each) and cut full blocks.

    labels are a copy of input_ids: the model shifts them by one inside its loss (position t is
    scored on predicting token t+1), so the data does not shift anything. The last partial block
    is dropped. The checked form of `cut_into_blocks` (lesson 04 writes it in its own cell).
    """
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 2:
        raise ValueError(f"block_size must be an integer >= 2 (got {block_size!r}).")
    if isinstance(token_ids_list, str) or not isinstance(token_ids_list, Sequence):
        raise TypeError("token_ids_list must be a list of token id lists, e.g. tokenizer(texts).")
    for ids in token_ids_list:
        if isinstance(ids, str) or not isinstance(ids, Sequence):
            raise TypeError("each item of token_ids_list must be a list of token ids, not text.")
    n_tokens = sum(len(ids) + (separator_id is not None) for ids in token_ids_list)
    if n_tokens < block_size:
        raise ValueError(
            f"The text has {n_tokens} tokens, shorter than one block of {block_size}; "
            "use a smaller block_size or more text."
        )
    return cut_into_blocks(token_ids_list, block_size, separator_id)


def text_block_dataset(tokenizer, texts: Sequence[str], block_size: int = 128):
    """Return texts as a ``datasets.Dataset`` of full blocks of `block_size` tokens (causal LM).

    Each text is tokenized, the end-of-text token goes after each, and `group_texts` cuts the
    stream; ``SFTTrainer`` takes the rows as they are (already tokenized, labels = input_ids).
    """
    if isinstance(texts, str) or not isinstance(texts, Sequence) or not texts:
        raise ValueError("texts must be a non-empty list of strings, e.g. load_python_reference().")
    ids = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in texts]
    return Dataset.from_dict(group_texts(ids, block_size, separator_id=tokenizer.eos_token_id))


# ---------------------------------------------------------------------------------------------
# 5. Splits.
# ---------------------------------------------------------------------------------------------


def train_validation_split(
    examples: Sequence, fraction: float = 0.1, seed: int = SEED
) -> tuple[list, list]:
    """Shuffle with `seed` and return (train, validation), validation holding `fraction` of them."""
    if isinstance(examples, str | dict) or not isinstance(examples, Sequence):
        raise TypeError("examples must be a list.")
    if isinstance(fraction, bool) or not isinstance(fraction, int | float) or not 0 < fraction < 1:
        raise ValueError(f"fraction must be between 0 and 1, e.g. 0.1 (got {fraction!r}).")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an integer (got {seed!r}).")
    n_validation = round(len(examples) * fraction)
    if n_validation < 1 or n_validation >= len(examples):
        raise ValueError(
            f"fraction={fraction} of {len(examples)} examples leaves one side empty; "
            "use more examples or a fraction nearer 0.5."
        )
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    validation = sorted(order[:n_validation])
    chosen = set(validation)
    train = [examples[i] for i in range(len(examples)) if i not in chosen]
    return train, [examples[i] for i in validation]


# ---------------------------------------------------------------------------------------------
# 6. Dataset 1 (instruction following): rental listing -> strict JSON.
# ---------------------------------------------------------------------------------------------

# Cities of the United Kingdom (a public fact; the names are the usual English ones).
UK_CITIES = (
    "Aberdeen", "Bath", "Belfast", "Birmingham", "Bradford", "Brighton and Hove", "Bristol",
    "Cambridge", "Canterbury", "Cardiff", "Carlisle", "Chester", "Coventry", "Derby", "Dundee",
    "Durham", "Edinburgh", "Exeter", "Glasgow", "Gloucester", "Hereford", "Inverness",
    "Lancaster", "Leeds", "Leicester", "Lincoln", "Liverpool", "London", "Manchester",
    "Milton Keynes", "Newcastle upon Tyne", "Newport", "Norwich", "Nottingham", "Oxford", "Perth",
    "Peterborough", "Plymouth", "Portsmouth", "Preston", "Salford", "Sheffield", "Southampton",
    "St Albans", "Stirling", "Stoke-on-Trent", "Sunderland", "Swansea", "Wakefield", "Winchester",
    "Wolverhampton", "Worcester", "York",
)  # fmt: skip
PROPERTY_TYPES = ("flat", "house", "bungalow", "maisonette", "studio")
# How a listing may name each type (the label set above is what the JSON must say).
TYPE_WORDS = {
    "flat": ("flat", "apartment", "flat", "apartment", "penthouse flat", "ground-floor flat"),
    "house": ("house", "terraced house", "semi-detached house", "detached house", "townhouse",
              "cottage", "end-of-terrace house"),
    "bungalow": ("bungalow", "detached bungalow", "semi-detached bungalow"),
    "maisonette": ("maisonette", "duplex maisonette"),
    "studio": ("studio", "studio flat", "studio apartment"),
}  # fmt: skip
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six")
INSTRUCTION_SYSTEM = (
    'Convert the rental listing to JSON only, with keys "bedrooms" (integer, 0 for a studio), '
    '"type" (flat, house, bungalow, maisonette or studio), "city", "rent_gbp" (integer) and '
    '"rent_period" (month or week).'
)


def _bedroom_phrase(rng: random.Random, n: int) -> str:
    """Return one way of writing 'n bedrooms' before a property type."""
    word = NUMBER_WORDS[n]
    return rng.choice(
        [f"{n}-bed", f"{n} bed", f"{word}-bedroom", f"{word} bedroom", f"{n}BR",
         f"{n}-bedroom", f"{word}-bed", f"{n} bedroom"]
    )  # fmt: skip


def _rent_phrase(rng: random.Random, amount: int, period: str) -> str:
    """Return one way of writing a rent of `amount` pounds per `period`."""
    number = rng.choice([f"{amount:,}", f"{amount}"]) if amount >= 1000 else str(amount)
    money = rng.choice([f"£{number}", f"£{number}", f"£{number}", f"{number} GBP", f"£{amount}.00"])
    if period == "month":
        unit = rng.choice(["pcm", "per month", "/month", "a month", "p/m", "per calendar month"])
    else:
        unit = rng.choice(["pw", "per week", "/week", "a week", "p/w"])
    if money.endswith("GBP") and unit.startswith("/"):
        unit = unit.replace("/", "per ")
    return f"{money}{unit}" if unit.startswith("/") else f"{money} {unit}"


def make_listing(rng: random.Random) -> tuple[str, dict[str, Any]]:
    """Return one random listing sentence and the JSON record it must be converted to."""
    kind = rng.choice(PROPERTY_TYPES)
    bedrooms = 0 if kind == "studio" else rng.randint(1, 2 if kind == "maisonette" else 5)
    if kind == "flat":
        bedrooms = rng.choice([1, 1, 2, 2, 2, 3, 3, 4])
    city = rng.choice(UK_CITIES)
    period = "week" if rng.random() < 0.3 else "month"
    if period == "month":
        rent = rng.randrange(450, 3001, 25) + (rng.choice([0, 0, 0, 5, 10, 15]))
    else:
        rent = rng.randrange(90, 701, 5)
    type_word = rng.choice(TYPE_WORDS[kind])
    beds = "" if kind == "studio" else _bedroom_phrase(rng, bedrooms) + " "
    with_rooms = (
        ""
        if kind == "studio"
        else rng.choice(
            [f" with {bedrooms} bedroom{'s' * (bedrooms > 1)}",
             f" with {NUMBER_WORDS[bedrooms]} bedroom{'s' * (bedrooms > 1)}"]
        )
    )  # fmt: skip
    city_text = city.upper() if rng.random() < 0.15 else city
    money = _rent_phrase(rng, rent, period)
    adjective = rng.choice(
        ["Spacious", "Bright", "Modern", "Charming", "Newly refurbished", "Cosy", "Large",
         "Well-presented", "Stunning", "Affordable"]
    )  # fmt: skip
    extra = rng.choice(
        ["", "", "Bills included.", "No pets.", "Unfurnished.", "Garden and parking.",
         f"Deposit £{rng.randrange(500, 3001, 50):,}.", rng.choice(["1 bathroom.", "2 bathrooms.", "Two bathrooms."]),
         "Close to the station.", "Students welcome.", "EPC rating C.", "Available now."]
    )  # fmt: skip
    where = rng.choice(["in", "in central", "near", "in north", "in south", "close to"])
    templates = [
        "{adj} {beds}{type} {where} {city}, {money}. {extra}",
        "{city}: {beds}{type} to let at {money}. {extra}",
        "To let - {beds}{type}, {where} {city}, {money}. {extra}",
        "{money} - {adj_l} {type}{with_rooms} {where} {city}. {extra}",
        "Available now: {beds}{type} {where} {city} for {money}. {extra}",
        "{extra} {adj} {type}{with_rooms}, {city}. Rent: {money}.",
        "Looking for a tenant for my {beds}{type} {where} {city}; asking {money}. {extra}",
        "{city} | {beds}{type} | {money} | {extra}",
        "{adj} {type}{with_rooms} to rent {where} {city} at {money}. {extra}",
    ]
    sentence = rng.choice(templates).format(
        adj=adjective,
        adj_l=adjective.lower(),
        beds=beds,
        type=type_word,
        with_rooms=with_rooms,
        where=where,
        city=city_text,
        money=money,
        extra=extra,
    )
    sentence = " ".join(sentence.split()).strip(" |")
    record = {
        "bedrooms": bedrooms,
        "type": kind,
        "city": city,
        "rent_gbp": rent,
        "rent_period": period,
    }
    return sentence, record


def instruction_example(sentence: str, record: dict[str, Any]) -> Example:
    """Return the chat example for one listing: system (schema), user (listing), assistant (JSON)."""
    return {
        "messages": [
            {"role": "system", "content": INSTRUCTION_SYSTEM},
            {"role": "user", "content": sentence},
            {"role": "assistant", "content": json.dumps(record)},
        ]
    }


def _check_split(split: str) -> None:
    """Raise unless `split` is train, validation or test."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)} (got {split!r}).")


def load_instruction_task(split: str = "train") -> list[Example]:
    """Return the shipped rentals examples of one split (listing -> strict JSON)."""
    _check_split(split)
    return read_jsonl(DATA_DIR / f"rentals_{split}.jsonl")


def parse_json_answer(text: str, strict: bool = True) -> dict | None:
    """Parse a model's answer as a JSON object (strict: the whole answer, else the first {...})."""
    if not isinstance(text, str):
        raise TypeError(f"text must be a string (got {type(text).__name__}).")
    candidate = text.strip()
    if not strict:
        match = re.search(r"\{.*?\}", candidate, flags=re.DOTALL)
        candidate = match.group(0) if match else candidate
    try:
        value = json.loads(candidate)
    except json.JSONDecodeError:
        return None
    return value if isinstance(value, dict) else None


def _object_end(text: str) -> int | None:
    """Return the index just after the JSON object that `text` opens with, or None if unclosed."""
    depth, in_string, escaped = 0, False, False
    for i, char in enumerate(text):
        if escaped:
            escaped = False
        elif in_string:
            escaped = char == "\\"
            in_string = char != '"'
        elif char == '"':
            in_string = True
        elif char == "{":
            depth += 1
        elif char == "}":
            depth -= 1
            if depth == 0:
                return i + 1
    return None


def json_answer_decided(text: str) -> bool:
    """Say whether more tokens can no longer change how `text` scores, strictly or leniently.

    Lenient scoring reads the first {...}: decided once it is closed. Strict scoring needs the
    whole answer to be one JSON object: lost as soon as the answer starts with something else
    or goes on after the object closes. Generation can stop a row here (`evaluate_instruction`).
    """
    if re.search(r"\{.*?\}", text, flags=re.DOTALL) is None:
        return False
    answer = text.lstrip()
    if not answer.startswith("{"):
        return True
    end = _object_end(answer)
    return end is not None and answer[end:].strip() != ""


def exact_match(prediction_text: str, reference_json_text: str, strict: bool = True) -> bool:
    """Say whether the prediction parses to the same JSON object as the reference (key order aside).

    strict=True (the course metric) needs the answer to be the JSON object and nothing else;
    strict=False reads the first {...} in the answer, forgiving extra words around it.
    """
    reference = parse_json_answer(reference_json_text)
    if reference is None:
        raise ValueError(f"The reference is not a JSON object: {reference_json_text!r}.")
    prediction = parse_json_answer(prediction_text, strict=strict)
    return prediction is not None and prediction == reference


# ---------------------------------------------------------------------------------------------
# 7. Dataset 3 (classification): a standard-library docstring -> its documentation section.
# ---------------------------------------------------------------------------------------------

# Sections of the Python Library Reference index (docs.python.org/3/library/) and the modules
# listed under each; labels are short names of those sections.
LIBRARY_SECTIONS = {
    "text processing": ("string", "re", "difflib", "textwrap", "unicodedata", "stringprep"),
    "data types": ("datetime", "zoneinfo", "calendar", "collections", "collections.abc", "heapq",
                   "bisect", "array", "weakref", "types", "copy", "pprint", "reprlib", "enum",
                   "graphlib"),
    "numeric": ("numbers", "math", "cmath", "decimal", "fractions", "random", "statistics"),
    "file access": ("pathlib", "os.path", "fileinput", "stat", "filecmp", "tempfile", "glob",
                    "fnmatch", "linecache", "shutil"),
    "compression": ("zlib", "gzip", "bz2", "lzma", "zipfile", "tarfile"),
    "concurrency": ("threading", "multiprocessing", "multiprocessing.pool", "concurrent.futures",
                    "subprocess", "sched", "queue", "contextvars"),
    "markup": ("html", "html.parser", "html.entities", "xml.etree.ElementTree", "xml.dom",
               "xml.dom.minidom", "xml.dom.pulldom", "xml.sax", "xml.sax.handler",
               "xml.sax.saxutils", "xml.sax.xmlreader"),
    "internet protocols": ("webbrowser", "wsgiref.util", "wsgiref.simple_server",
                           "urllib.request", "urllib.parse", "urllib.error",
                           "urllib.robotparser", "http", "http.client", "ftplib", "poplib",
                           "imaplib", "smtplib", "uuid", "socketserver", "http.server",
                           "http.cookies", "http.cookiejar", "xmlrpc.client", "xmlrpc.server",
                           "ipaddress"),
}  # fmt: skip
CLASSIFICATION_LABELS = tuple(LIBRARY_SECTIONS)
CLASSIFICATION_SYSTEM = (
    "Which section of the Python standard library documentation does this docstring come "
    "from? Answer with one of: " + ", ".join(CLASSIFICATION_LABELS) + "."
)


def classification_example(text: str, label: str, source: str | None = None) -> Example:
    """Return the chat example for one docstring: system (labels), user (text), assistant (label)."""
    if label not in CLASSIFICATION_LABELS:
        raise ValueError(f"label must be one of {CLASSIFICATION_LABELS} (got {label!r}).")
    example: Example = {
        "messages": [
            {"role": "system", "content": CLASSIFICATION_SYSTEM},
            {"role": "user", "content": text},
            {"role": "assistant", "content": label},
        ]
    }
    if source is not None:
        example["source"] = source
    return example


def load_classification_task(split: str = "train") -> list[Example]:
    """Return the shipped stdlib-docstring classification examples of one split."""
    _check_split(split)
    return read_jsonl(DATA_DIR / f"stdlib_docs_{split}.jsonl")


def label_from_answer(text: str, labels: Sequence[str] = CLASSIFICATION_LABELS) -> str | None:
    """Return the label the answer names first (case-insensitive), or None if it names none."""
    if not isinstance(text, str):
        raise TypeError(f"text must be a string (got {type(text).__name__}).")
    lowered = text.lower()
    found = [(lowered.find(label.lower()), label) for label in labels if label.lower() in lowered]
    return min(found)[1] if found else None


# ---------------------------------------------------------------------------------------------
# 8. Measuring a model on a task (greedy, batched with left padding).
# ---------------------------------------------------------------------------------------------


def evaluate_instruction(
    model,
    tokenizer,
    examples: Sequence[Example],
    *,
    batch_size: int = 64,
    max_new_tokens: int | None = None,
) -> dict[str, Any]:
    """Generate answers for rentals examples and return exact match (strict and lenient).

    The token budget defaults to the longest reference answer plus ANSWER_SLACK tokens (a
    longer answer cannot be the same JSON); a row stops as soon as its score is decided
    (`json_answer_decided`), which gives the same scores as generating to the budget.
    """
    if not examples:
        raise ValueError("examples is empty; pass e.g. load_instruction_task('test').")
    prompts = [prompt_messages(e) for e in examples]
    references = [reference_answer(e) for e in examples]
    if max_new_tokens is None:
        longest = max(len(tokenizer(r, add_special_tokens=False)["input_ids"]) for r in references)
        max_new_tokens = longest + ANSWER_SLACK
    predictions = generate_batch(
        model,
        tokenizer,
        prompts,
        batch_size=batch_size,
        max_new_tokens=max_new_tokens,
        stop_when=json_answer_decided,
    )
    strict = [exact_match(p, r) for p, r in zip(predictions, references)]
    lenient = [exact_match(p, r, strict=False) for p, r in zip(predictions, references)]
    return {
        "exact_match": sum(strict) / len(strict),
        "lenient_match": sum(lenient) / len(lenient),
        "predictions": predictions,
        "references": references,
        "correct": strict,
    }


def evaluate_classification(
    model, tokenizer, examples: Sequence[Example], *, batch_size: int = 64, max_new_tokens: int = 12
) -> dict[str, Any]:
    """Generate answers for classification examples and return the accuracy of the labels read."""
    if not examples:
        raise ValueError("examples is empty; pass e.g. load_classification_task('test').")
    prompts = [prompt_messages(e) for e in examples]
    predictions = generate_batch(
        model, tokenizer, prompts, batch_size=batch_size, max_new_tokens=max_new_tokens
    )
    read = [label_from_answer(p) for p in predictions]
    references = [reference_answer(e) for e in examples]
    correct = [r == ref for r, ref in zip(read, references)]
    return {
        "accuracy": sum(correct) / len(correct),
        "predictions": predictions,
        "labels_read": read,
        "references": references,
        "correct": correct,
    }
