"""Chat-style generation with the course model: one question, or a batch with left padding.

Lesson 00, and the scoring of lessons 05-07 and 10-15.

A decoder generates to the right of its prompt, so a batch of prompts of different lengths is
padded on the *left*: every prompt then ends at the same position and the new tokens line up.
Four things make a CPU evaluation fast (`make bench` measures them, `bench eval`):

- **batches**: one decoding step reads every weight once, whatever the batch; 64 rows cost
  far less than four batches of 16;
- **a shared prefix computed once**: the course's tasks start every prompt with the same
  system message (72 of the rentals prompts' ~100 tokens). Its keys and values are computed
  once and copied to every row; each row's own tokens follow it, padded on the left of *their*
  part (the attention mask skips the gap, the positions count only real tokens);
- **stopping a row when its score is decided** (`stop_when`): a row that has closed its JSON
  answer and gone on writing cannot become right any more; end-of-turn stops the others;
- **grouped-query attention without copies** (on a CPU): SmolLM2 has 9 query heads and 3
  key/value heads. transformers' SDPA attention lets the kernel share each key/value head among
  its 3 query heads (``enable_gqa``) only when there is no attention mask; with the padding
  mask of a batch it copies the whole key/value cache 3 times in every layer at every step,
  a third of the time of a batched generation here. `sdpa_gqa_attention` always passes
  ``enable_gqa``: the same numbers, no copy. `generate_batch` uses it on a CPU, for the
  duration of the call, and puts the model's own attention back.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterator, Sequence

import torch
from transformers import AttentionInterface, DynamicCache, StoppingCriteriaList
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

Message = dict[str, str]
#: A shared prefix shorter than this is not worth a separate forward pass.
MIN_SHARED_PREFIX = 8
#: The name `sdpa_gqa_attention` is registered under in transformers' AttentionInterface.
SDPA_GQA = "course_sdpa_gqa"


def sdpa_gqa_attention(
    module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kwargs
):
    """transformers' SDPA attention, with grouped-query heads shared by the kernel, mask or not."""
    is_causal = module.is_causal if is_causal is None else is_causal
    is_causal = query.shape[2] > 1 and attention_mask is None and is_causal
    output = torch.nn.functional.scaled_dot_product_attention(
        query,
        key,
        value,
        attn_mask=attention_mask,
        dropout_p=dropout,
        scale=scaling,
        is_causal=is_causal,
        enable_gqa=key.shape[1] != query.shape[1],
    )
    return output.transpose(1, 2).contiguous(), None


@contextlib.contextmanager
def _gqa_attention(model) -> Iterator[None]:
    """On a CPU, run `model` with `sdpa_gqa_attention` inside the block (if it uses SDPA)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = getattr(base, "config", None)
    own = getattr(config, "_attn_implementation", None)
    device = next(model.parameters()).device
    if own != "sdpa" or device.type != "cpu" or not hasattr(base, "set_attn_implementation"):
        yield
        return
    AttentionInterface.register(SDPA_GQA, sdpa_gqa_attention)
    AttentionMaskInterface.register(SDPA_GQA, sdpa_mask)  # the masks SDPA itself gets
    base.set_attn_implementation(SDPA_GQA)
    try:
        yield
    finally:
        base.set_attn_implementation(own)


def as_messages(prompt: str | Sequence[Message], system: str | None = None) -> list[Message]:
    """Turn a question (str) or a list of chat messages into a list of chat messages."""
    if isinstance(prompt, str):
        if not prompt.strip():
            raise ValueError("The prompt is empty; pass a question such as 'What is LoRA?'.")
        messages = [{"role": "user", "content": prompt}]
    elif isinstance(prompt, Sequence) and all(
        isinstance(m, dict) and "role" in m and "content" in m for m in prompt
    ):
        messages = list(prompt)
    else:
        raise TypeError(
            "prompt must be a string or a list of {'role': ..., 'content': ...} messages "
            f"(got {type(prompt).__name__})."
        )
    if system is not None and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": system}, *messages]
    return messages


def shared_prefix_length(rows: Sequence[Sequence[int]]) -> int:
    """Return how many leading token ids every row shares (at most the shortest row minus one)."""
    if not rows:
        return 0
    shortest = min(len(row) for row in rows)
    n = 0
    while n < shortest - 1 and all(row[n] == rows[0][n] for row in rows):
        n += 1
    return n


class _StopWhen:
    """A generation stopping criterion: a row stops once `decided(its new text)` is True."""

    def __init__(self, tokenizer, prompt_length: int, decided: Callable[[str], bool]):
        self.tokenizer = tokenizer
        self.prompt_length = prompt_length
        self.decided = decided

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.BoolTensor:
        """Return, for each row, whether its answer so far is decided."""
        texts = self.tokenizer.batch_decode(
            input_ids[:, self.prompt_length :], skip_special_tokens=True
        )
        return torch.tensor([self.decided(t) for t in texts], device=input_ids.device)


def _check_batch_args(prompts, max_new_tokens, batch_size, stop_when) -> None:
    """Raise a one-sentence error for a bad argument of generate_batch."""
    if isinstance(prompts, str) or not isinstance(prompts, Sequence):
        raise TypeError("prompts must be a list of prompts; for a single one use chat().")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive integer (got {max_new_tokens!r}).")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer (got {batch_size!r}).")
    if stop_when is not None and not callable(stop_when):
        raise TypeError("stop_when must be a function of the answer text that returns a bool.")


@torch.no_grad()
def _prefix_cache(model, prefix: list[int], device):
    """Return the key/value cache of one copy of the shared prefix."""
    cache = DynamicCache(config=model.config)
    model(input_ids=torch.tensor([prefix], device=device), past_key_values=cache, use_cache=True)
    return cache


def _batch(rows: Sequence[list[int]], prefix_length: int, pad_id: int, device):
    """Ids and attention mask: the shared prefix, then each row's own tokens left-padded."""
    width = max(len(row) for row in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(input_ids)
    for i, row in enumerate(rows):
        own = row[prefix_length:]
        input_ids[i, :prefix_length] = torch.tensor(row[:prefix_length])
        mask[i, :prefix_length] = 1
        input_ids[i, width - len(own) :] = torch.tensor(own)
        mask[i, width - len(own) :] = 1
    return input_ids.to(device), mask.to(device)


@torch.no_grad()
def generate_batch(
    model,
    tokenizer,
    prompts: Sequence[str | Sequence[Message]],
    *,
    max_new_tokens: int = 64,
    batch_size: int = 64,
    system: str | None = None,
    stop_when: Callable[[str], bool] | None = None,
    share_prefix: bool = True,
) -> list[str]:
    """Answer each prompt greedily, `batch_size` at a time, and return the decoded answers.

    A row ends at end-of-turn, after `max_new_tokens`, or (with `stop_when`) as soon as
    ``stop_when(answer so far)`` is True. With `share_prefix` the prompts' common first tokens
    (a shared system message) are computed once; the answers are the same as without.
    """

    _check_batch_args(prompts, max_new_tokens, batch_size, stop_when)
    texts = [
        tokenizer.apply_chat_template(
            as_messages(p, system), tokenize=False, add_generation_prompt=True
        )
        for p in prompts
    ]
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    rows = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    prefix_length = shared_prefix_length(rows) if share_prefix and len(rows) > 1 else 0
    if prefix_length < MIN_SHARED_PREFIX:
        prefix_length = 0
    was_training = model.training
    model.eval()
    try:
        with _gqa_attention(model):
            answers = _generate_chunks(
                model, tokenizer, rows, prefix_length, batch_size, max_new_tokens, stop_when
            )
    finally:
        model.train(was_training)
    return [a.strip() for a in answers]


def _generate_chunks(model, tokenizer, rows, prefix_length, batch_size, max_new_tokens, stop_when):
    """Generate the answers of `rows` (token ids), `batch_size` at a time, after the shared prefix."""
    device = next(model.parameters()).device
    answers: list[str] = []
    cache = _prefix_cache(model, rows[0][:prefix_length], device) if prefix_length else None
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        input_ids, mask = _batch(chunk, prefix_length, tokenizer.pad_token_id, device)
        options = {}
        if cache is not None:
            options["past_key_values"] = copy.deepcopy(cache)
            options["past_key_values"].batch_repeat_interleave(len(chunk))
        if stop_when is not None:
            stop = _StopWhen(tokenizer, input_ids.shape[1], stop_when)
            options["stopping_criteria"] = StoppingCriteriaList([stop])
        output = model.generate(
            input_ids=input_ids,
            attention_mask=mask,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
            **options,
        )
        new_tokens = output[:, input_ids.shape[1] :]
        answers += tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
    return answers


def chat(
    model,
    tokenizer,
    prompt: str | Sequence[Message],
    *,
    max_new_tokens: int = 64,
    system: str | None = None,
) -> str:
    """Answer one question (or one conversation) greedily and return the answer text."""
    return generate_batch(model, tokenizer, [prompt], max_new_tokens=max_new_tokens, system=system)[
        0
    ]
