"""Chat-style generation with the course model: one question, or a batch with left padding.

A decoder generates to the right of its prompt, so a batch of prompts of different lengths is
padded on the *left*: every prompt then ends at the same position and the new tokens line up.
One batch of 16 costs little more than one prompt on a CPU, so evaluations always batch.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

Message = dict[str, str]


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


@torch.no_grad()
def generate_batch(
    model,
    tokenizer,
    prompts: Sequence[str | Sequence[Message]],
    *,
    max_new_tokens: int = 64,
    batch_size: int = 16,
    system: str | None = None,
) -> list[str]:
    """Answer each prompt greedily, `batch_size` at a time, and return the decoded answers."""
    if isinstance(prompts, str) or not isinstance(prompts, Sequence):
        raise TypeError("prompts must be a list of prompts; for a single one use chat().")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive integer (got {max_new_tokens!r}).")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer (got {batch_size!r}).")
    texts = [
        tokenizer.apply_chat_template(
            as_messages(p, system), tokenize=False, add_generation_prompt=True
        )
        for p in prompts
    ]
    pad_side, tokenizer.padding_side = tokenizer.padding_side, "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    answers: list[str] = []
    try:
        for start in range(0, len(texts), batch_size):
            batch = tokenizer(
                texts[start : start + batch_size],
                return_tensors="pt",
                padding=True,
                add_special_tokens=False,
            ).to(device)
            output = model.generate(
                **batch,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
            )
            new_tokens = output[:, batch["input_ids"].shape[1] :]
            answers += tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
    finally:
        tokenizer.padding_side = pad_side
        model.train(was_training)
    return [a.strip() for a in answers]


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
