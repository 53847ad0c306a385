"""Checks for the exercises of lesson 07 (Full fine-tuning lab): perplexity, per-token losses, the comparison table.

The perplexity checks run the notebook's tiny Llama on the held-out reference text and the
rental listings and compare with `course_utils.evaluate` (perplexity, answer_loss), the
functions the lab used; the table checks rebuild the table from the rows.
"""

from __future__ import annotations

import copy
import math

import torch
from torch.nn.functional import cross_entropy

from course_utils.data import group_texts, pad_batch, tokenize_with_assistant_mask
from course_utils.evaluate import answer_loss, perplexity
from course_utils.exercise_checks.feedback import exercise, expect, isclose

# Exercise 1: perplexity from per-token losses.


def _blocks(tokenizer, texts, block_size, max_blocks) -> torch.Tensor:
    """The first max_blocks blocks of block_size tokens of texts, as evaluate.perplexity cuts them."""
    ids = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in texts]
    blocks = group_texts(ids, block_size, separator_id=tokenizer.eos_token_id)["input_ids"]
    return torch.tensor(blocks[:max_blocks])


def _losses_of(model, ids) -> torch.Tensor:
    """The per-token next-token losses of model on full blocks, one row per block (reference)."""
    with torch.no_grad():
        logits = model(input_ids=ids).logits[:, :-1].float()
    return cross_entropy(
        logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="none"
    ).reshape(ids.shape[0], -1)


def _pieces(flat, sizes, as_lists) -> list:
    """Cut a 1-D tensor into consecutive pieces of the given sizes (repeated), lists or tensors."""
    pieces, start, i = [], 0, 0
    while start < flat.numel():
        piece = flat[start : start + sizes[i % len(sizes)]]
        pieces.append(piece.tolist() if as_lists else piece.clone())
        start, i = start + piece.numel(), i + 1
    return pieces


def _check_perplexity(
    perplexity_from_losses, model, tokenizer, texts, block_size, max_blocks, sizes, as_lists
) -> float:
    """Compare perplexity_from_losses with evaluate.perplexity; explain a mismatch."""
    expected = perplexity(model, tokenizer, texts, block_size=block_size, max_blocks=max_blocks)
    flat = _losses_of(model, _blocks(tokenizer, texts, block_size, max_blocks)).reshape(-1)
    pieces = _pieces(flat, sizes, as_lists)
    got = perplexity_from_losses(pieces)
    expect(
        isinstance(got, float),
        f"perplexity_from_losses returned {type(got).__name__}, not a float. "
        "Hint: the perplexity is one plain Python number.",
    )
    if isclose(got, expected, rel_tol=1e-4):
        return got
    lengths = [len(piece) for piece in pieces]
    means = [sum(piece) / len(piece) for piece in pieces]
    hint = "the perplexity is the exponential of the mean loss per token, each token counted once."
    for wrong, text in (
        (
            math.exp(sum(means) / len(means)),
            "that is the mean of the pieces' means: weigh every token once.",
        ),
        (
            sum(math.exp(m) for m in means) / len(means),
            "that is the mean of the pieces' perplexities.",
        ),
        (math.log(expected), "that is the mean loss: the perplexity is its exponential."),
        (2 ** math.log(expected), "the losses are natural logarithms: use exp, not 2 **."),
    ):
        if isclose(got, wrong, rel_tol=1e-4):
            hint = text
            break
    expect(
        False,
        f"perplexity_from_losses gives {got:,.6g}, expected {expected:,.6g} "
        f"({len(pieces)} pieces of lengths {sorted(set(lengths))}). Hint: {hint}",
    )


def _check_known(perplexity_from_losses, losses, expected) -> None:
    """A hand-made input whose perplexity is known."""
    got = perplexity_from_losses(losses)
    expect(
        isinstance(got, int | float)
        and not isinstance(got, bool)
        and isclose(got, expected, rel_tol=1e-6),
        f"perplexity_from_losses({losses!r}) is {got!r}, expected {expected!r}. Hint: every loss "
        "counts once, whatever piece it comes in; an empty piece adds nothing, and a piece may "
        "be a list or a tensor.",
    )


def _check_empty(perplexity_from_losses, losses) -> None:
    """No loss at all: a ValueError, not a number and not another error."""
    try:
        answer = f"returned {perplexity_from_losses(losses)!r}"
    except ValueError:
        return
    except ZeroDivisionError:
        answer = "raised ZeroDivisionError"
    expect(
        False,
        f"perplexity_from_losses({losses!r}) holds no loss at all, and it {answer}. "
        "Hint: raise a ValueError when there is nothing to average.",
    )


@exercise(1, "perplexity_from_losses")
def perplexity_from_losses(
    perplexity_from_losses, model, tokenizer, texts, cases=None, known=(), empty=()
) -> str | None:
    """Exercise 1: perplexity_from_losses against evaluate.perplexity on the tiny model's losses.

    `model`, `tokenizer` and `texts` are the notebook's (the held-out text). `cases` is a list of
    (model, block_size, max_blocks, sizes of the pieces, pieces as lists rather than tensors);
    `known` a list of (losses, perplexity) and `empty` of inputs without a loss (ValueError).
    """
    visible = cases is None
    if visible:
        cases = [(model, 64, 6, [5, 40, 1, 120, 17], True)]
    for case in cases:
        ppl = _check_perplexity(perplexity_from_losses, case[0], tokenizer, texts, *case[1:])
    for losses, expected in known:
        _check_known(perplexity_from_losses, losses, expected)
    for losses in empty:
        _check_empty(perplexity_from_losses, losses)
    if not visible:
        return None
    return (
        f"the tiny model's perplexity: {ppl:,.0f}\n"
        f"a uniform guess over the vocabulary: {len(tokenizer):,}"
    )


# Exercise 2: per-token losses from the model.


def _rows(got, n_rows) -> list[torch.Tensor]:
    """The rows of token_losses' answer as float tensors; explain a wrong type."""
    if isinstance(got, torch.Tensor):
        expect(
            got.dim() == 2,
            f"token_losses returned a tensor of shape {tuple(got.shape)}. "
            "Hint: return a list with one 1-D tensor of losses per row of input_ids.",
        )
    expect(
        isinstance(got, list | tuple | torch.Tensor),
        f"token_losses returned {type(got).__name__}. "
        "Hint: return a list with one 1-D tensor of losses per row of input_ids.",
    )
    got = list(got)
    expect(
        len(got) == n_rows,
        f"{len(got)} rows of losses for {n_rows} rows of input_ids. "
        "Hint: one row of losses per row of input_ids.",
    )
    return [torch.as_tensor(row, dtype=torch.float64).reshape(-1) for row in got]


def _check_blocks(token_losses, model, tokenizer, texts, block_size, max_blocks) -> None:
    """Full blocks: every next token counts; compare with evaluate.perplexity and the model."""
    ids = _blocks(tokenizer, texts, block_size, max_blocks)
    rows = _rows(token_losses(model, ids), ids.shape[0])
    with torch.no_grad():
        logits = model(input_ids=ids).logits.float()
        for i, row in enumerate(rows):
            expect(
                row.numel() != block_size,
                f"{block_size} losses for a block of {block_size} tokens. Hint: the last position "
                "has no next token to predict.",
            )
            expect(
                row.numel() == block_size - 1,
                f"row {i}: {row.numel()} losses, expected {block_size - 1}. "
                "Hint: one loss per next token.",
            )
            own = model(input_ids=ids[i : i + 1], labels=ids[i : i + 1]).loss.item()
            if isclose(row.mean().item(), own, rel_tol=1e-4):
                continue
            unshifted = cross_entropy(logits[i, :-1], ids[i, :-1]).item()
            if isclose(row.mean().item(), unshifted, rel_tol=1e-4):
                hint = (
                    "position t predicts token t + 1, but your losses score each position "
                    "against its own token."
                )
            elif (row <= 0).all():
                hint = "a loss is -log p, a positive number; yours are log-probabilities."
            elif (row < 1).all():
                hint = "those look like probabilities; a loss is -log p."
            else:
                hint = (
                    "a loss is minus the log-probability (a log-softmax over the vocabulary) "
                    "that the logits give the next token."
                )
            expect(
                False,
                f"row {i}: your mean loss is {row.mean().item():.6g}, the model's own loss is "
                f"{own:.6g}. Hint: {hint}",
            )
    everything = torch.cat(rows)
    expected = perplexity(model, tokenizer, texts, block_size=block_size, max_blocks=max_blocks)
    expect(
        isclose(math.exp(everything.mean().item()), expected, rel_tol=1e-4),
        "exp(mean of your losses) is not evaluate.perplexity. Hint: one loss per next token.",
    )


def _check_lists(token_losses, model, tokenizer, texts, block_size, max_blocks) -> None:
    """input_ids as a list of lists, not a tensor."""
    ids = _blocks(tokenizer, texts, block_size, max_blocks).tolist()
    try:
        lengths = [len(row) for row in token_losses(model, ids)]
    except Exception as error:  # the learner's code could not take lists
        lengths = f"{type(error).__name__}: {error}".splitlines()[0]
    expect(
        lengths == [block_size - 1] * len(ids),
        f"for input_ids given as {len(ids)} lists of {block_size} tokens, token_losses gave "
        f"{lengths!r}, expected {len(ids)} rows of {block_size - 1} losses. "
        "Hint: input_ids may come as lists of lists, not only as a tensor.",
    )


def _check_answers(token_losses, model, tokenizer, examples) -> float:
    """Assistant-only labels on a padded batch: compare with evaluate.answer_loss."""
    features = [tokenize_with_assistant_mask(tokenizer, example) for example in examples]
    padded = pad_batch(features, tokenizer.pad_token_id)
    rows = _rows(
        token_losses(model, padded["input_ids"], padded["labels"], padded["attention_mask"]),
        len(examples),
    )
    for i, (row, labels) in enumerate(zip(rows, padded["labels"])):
        wanted = int((labels[1:] != -100).sum())
        expect(
            row.numel() == wanted,
            f"listing {i}: {row.numel()} losses, but {wanted} answer tokens are predicted. "
            "Hint: only the positions whose next label is not -100 count.",
        )
    expected = answer_loss(model, tokenizer, examples)
    mean = torch.cat(rows).mean().item()
    expect(
        isclose(mean, expected, rel_tol=1e-4),
        f"the mean of your losses over the answers is {mean:.6g}, evaluate.answer_loss gives "
        f"{expected:.6g}. Hint: the logits at position t predict the next token, so its loss is "
        "about the next label; and the model needs the attention_mask.",
    )
    return mean


@exercise(2, "token_losses")
def token_losses(token_losses, model, tokenizer, texts, examples, cases=None) -> str | None:
    """Exercise 2: token_losses against evaluate.perplexity, evaluate.answer_loss and the model.

    `model`, `tokenizer`, `texts` and `examples` are the notebook's. `cases` is a list of
    ("blocks", model, block_size, max_blocks): full blocks of texts; ("lists", model, block_size,
    max_blocks): the same given as lists of lists; ("answers", model, examples): listings with
    assistant-only labels, padded.
    """
    visible = cases is None
    if visible:
        cases = [("blocks", model, 64, 4), ("answers", model, examples)]
    mean = None
    for kind, case_model, *rest in cases:
        if kind == "answers":
            mean = _check_answers(token_losses, case_model, tokenizer, *rest)
        elif kind == "lists":
            _check_lists(token_losses, case_model, tokenizer, texts, *rest)
        else:
            _check_blocks(token_losses, case_model, tokenizer, texts, *rest)
    if not visible:
        return None
    features = [tokenize_with_assistant_mask(tokenizer, example) for example in examples]
    batch = pad_batch(features, tokenizer.pad_token_id)
    rows = token_losses(model, batch["input_ids"], batch["labels"], batch["attention_mask"])
    return (
        f"losses per listing: {[len(row) for row in rows]}\n"
        f"answer loss {mean:.3f}; a uniform guess: log {len(tokenizer):,} = "
        f"{math.log(len(tokenizer)):.3f}"
    )


# Exercise 3: the comparison table, and the pick.

KEYS = ("method", "trainable", "peak_mb", "task_loss", "forgetting")
CRITERIA = ("peak_mb", "task_loss", "forgetting")


def _reference_table(rows, ppl_before) -> list[dict]:
    """The table the tests expect, straight from the rows."""
    table = []
    for name, row in rows.items():
        result = row["result"]
        table.append(
            {
                "method": name,
                "trainable": result.trainable_params,
                "peak_mb": result.peak_memory / 2**20,
                "task_loss": row["task_loss"],
                "forgetting": row["perplexity"] / ppl_before - 1,
            }
        )
    return table


_TABLE_HINTS = {
    "trainable": "trainable is the run's number of trainable parameters, from its TrainResult.",
    "peak_mb": "the TrainResult's peak memory is in bytes, and a MB here is 2**20 bytes.",
    "task_loss": "the row's task loss goes into the table unchanged.",
    "forgetting": (
        "forgetting is the relative rise of the perplexity over ppl_before (0.1 for +10 %)."
    ),
}


def _check_table(comparison, rows, ppl_before) -> list[dict]:
    """Compare comparison() with the reference, key by key; explain a mismatch."""
    original = copy.deepcopy(rows)
    got = comparison(rows, ppl_before)
    expect(rows == original, "comparison changed rows. Hint: build new dicts, leave rows alone.")
    expected = _reference_table(rows, ppl_before)
    expect(
        isinstance(got, list) and len(got) == len(expected),
        f"comparison must return a list of {len(expected)} dicts, got "
        f"{type(got).__name__}{f' of {len(got)}' if isinstance(got, list) else ''}. "
        "Hint: one dict per method of rows.",
    )
    for mine, wanted in zip(got, expected):
        expect(
            isinstance(mine, dict) and set(KEYS) <= set(mine),
            f"each entry needs the keys {KEYS}, got {mine!r:.120}. "
            "Hint: spell the keys as the exercise lists them.",
        )
        expect(
            mine["method"] == wanted["method"],
            f"entry {mine['method']!r} where {wanted['method']!r} was expected. "
            "Hint: keep the rows' order.",
        )
        for key in KEYS[1:]:
            value = mine[key]
            expect(
                isinstance(value, int | float) and not isinstance(value, bool),
                f"{wanted['method']}: {key} is {value!r}, not a number. Hint: {_TABLE_HINTS[key]}",
            )
            if isclose(value, wanted[key], rel_tol=1e-9, abs_tol=1e-12):
                continue
            hint = _TABLE_HINTS[key]
            if key == "forgetting" and isclose(value, wanted[key] + 1):
                hint = (
                    "that is the ratio of the perplexities; forgetting is 0 when nothing changed."
                )
            elif key == "forgetting" and isclose(value, 100 * wanted[key]):
                hint = "a fraction, not a percentage: 0.1 for +10 %."
            elif key == "peak_mb" and isclose(value, wanted[key] * 2**20 / 1e6):
                hint = "a MB here is 2**20 bytes, not 10**6."
            expect(
                False,
                f"{wanted['method']}: {key} is {value!r}, expected {wanted[key]!r}. Hint: {hint}",
            )
    return expected


def _dominates(a, b) -> bool:
    """Whether row a dominates row b (reference)."""
    return all(a[k] <= b[k] for k in CRITERIA) and any(a[k] < b[k] for k in CRITERIA)


def _check_front(worth_considering, table) -> list:
    """Compare worth_considering with the methods no other method dominates."""
    original = copy.deepcopy(table)
    got = worth_considering(table)
    expect(table == original, "worth_considering changed the table. Hint: only read it.")
    expected = [b["method"] for b in table if not any(_dominates(a, b) for a in table)]
    if list(got) == expected:
        return got
    extra = [m for m in got if m not in expected]
    missing = [m for m in expected if m not in got]
    if sorted(got) == sorted(expected):
        hint = "list them in table order."
    elif extra and extra[0] in [r["method"] for r in table]:
        row = next(r for r in table if r["method"] == extra[0])
        by = next(a["method"] for a in table if _dominates(a, row))
        hint = f"{extra[0]!r} is dominated by {by!r}: no lower on any of the three, higher on one."
    elif extra:
        hint = "return the names of methods of the table (their 'method')."
    elif not missing:
        hint = "name each method once."
    else:
        hint = (
            f"{missing[0]!r} is not dominated: nobody beats it on one criterion without losing on "
            "another (an identical row does not dominate it)."
        )
    expect(False, f"worth_considering gives {list(got)}, expected {expected}. Hint: {hint}")


def _check_pick(pick, table, memory_mb, max_forgetting) -> object:
    """Compare pick with the rule in the exercise; explain a mismatch."""
    allowed = [
        (row["task_loss"], row["peak_mb"], i, row["method"])
        for i, row in enumerate(table)
        if row["peak_mb"] <= memory_mb and row["forgetting"] <= max_forgetting
    ]
    expected = min(allowed)[3] if allowed else None
    got = pick(table, memory_mb, max_forgetting)
    if got == expected:
        return got
    chosen = next((r for r in table if r["method"] == got), None)
    if expected is None:
        hint = "no method is within both limits: say so with None."
    elif chosen is None:
        hint = "return the name of a method of the table (its 'method')."
    elif chosen["peak_mb"] > memory_mb:
        hint = f"{got!r} needs {chosen['peak_mb']:,.0f} MB, over the {memory_mb:,} MB budget."
    elif chosen["forgetting"] > max_forgetting:
        hint = f"{got!r} forgets {chosen['forgetting']:+.1%}, over the {max_forgetting:+.1%} limit."
    elif chosen["task_loss"] > min(allowed)[0]:
        hint = "another method within both limits has a lower task_loss."
    else:
        hint = "on a tie in task_loss the smaller peak_mb wins, then the first in the table."
    expect(
        False,
        f"pick(table, {memory_mb:,}, {max_forgetting}) is {got!r}, expected {expected!r}. "
        f"Hint: {hint}",
    )


#: (memory_mb, max_forgetting) of the visible picks.
VISIBLE_PICKS = [(3_100, 0.05), (4_096, 0.20), (1_000, 1.0)]  # at 3,100 MB two LoRAs tie


@exercise(3, "comparison", "worth_considering", "pick")
def comparison(comparison, worth_considering, pick, rows, ppl_before, cases=None) -> str | None:
    """Exercise 3: the table, the methods worth considering and the pick, against a reference.

    `rows` and `ppl_before` are the notebook's. `cases` is a list of (rows, ppl_before, picks):
    comparison is checked on the rows, worth_considering and pick (one per (memory_mb,
    max_forgetting) of picks) on the reference table of those rows.
    """
    visible = cases is None
    if visible:
        cases = [(rows, ppl_before, VISIBLE_PICKS)]
    for case_rows, case_ppl, picks in cases:
        table = _check_table(comparison, case_rows, case_ppl)
        _check_front(worth_considering, table)
        for memory_mb, max_forgetting in picks:
            _check_pick(pick, table, memory_mb, max_forgetting)
    if not visible:
        return None
    lines = [
        f"{entry['method']:17s} {entry['peak_mb']:7,.0f} MB  task loss {entry['task_loss']:.3f}"
        f"  forgetting {entry['forgetting']:+.1%}"
        for entry in comparison(rows, ppl_before)
    ]
    lines.append(f"worth considering: {worth_considering(table)}")
    for budget, limit in ((1_100, 0.10), (3_000, 0.05), (4_096, 0.05), (4_096, 0.20)):
        lines.append(
            f"within {budget:,} MB and {limit:+.0%} forgetting: {pick(table, budget, limit)}"
        )
    return "\n".join(lines)
