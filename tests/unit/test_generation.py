"""course_utils.generation: chat and left-padded batches give the same greedy answers."""

import pytest
import torch

from course_utils import data
from course_utils.generation import as_messages, chat, generate_batch, shared_prefix_length

QUESTIONS = [
    "What is the capital of France?",
    "Name a primary colour.",
    "Write the word 'hello' backwards, then explain in one sentence how you did it.",
]


def test_a_batch_answers_like_one_question_at_a_time(model, tokenizer):
    """Left padding must not change greedy answers: prompts of different lengths batch safely."""
    texts = [tokenizer.apply_chat_template(as_messages(q), tokenize=False) for q in QUESTIONS]
    lengths = {len(tokenizer(text)["input_ids"]) for text in texts}
    assert len(lengths) > 1, "the prompts must differ in length for padding to matter"
    batched = generate_batch(model, tokenizer, QUESTIONS, max_new_tokens=12)
    alone = [chat(model, tokenizer, q, max_new_tokens=12) for q in QUESTIONS]
    assert batched == alone


def test_a_shared_system_prompt_computed_once_gives_the_same_answers(model, tokenizer):
    """The prefix's keys and values, copied to every row, answer exactly like the full prompts."""
    listings = [data.prompt_messages(e) for e in data.load_instruction_task("test")[:5]]
    texts = [
        tokenizer.apply_chat_template(m, tokenize=False, add_generation_prompt=True)
        for m in listings
    ]
    rows = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    assert shared_prefix_length(rows) > 60  # the schema in the system message
    shared = generate_batch(model, tokenizer, listings, max_new_tokens=10, batch_size=3)
    plain = generate_batch(
        model, tokenizer, listings, max_new_tokens=10, batch_size=3, share_prefix=False
    )
    assert shared == plain


def test_grouped_query_attention_without_copies_gives_the_models_own_logits(model, tokenizer):
    """generate_batch's attention (enable_gqa under a padding mask) = transformers' SDPA path."""
    from course_utils import generation

    batch = tokenizer(
        ["A short one.", "A longer question about rental listings in Leeds?"],
        return_tensors="pt",
        padding=True,
    )
    with torch.no_grad():
        own = model(**batch).logits
        with generation._gqa_attention(model):
            assert model.config._attn_implementation == generation.SDPA_GQA
            shared = model(**batch).logits
    assert model.config._attn_implementation == "sdpa"  # put back
    mask = batch["attention_mask"].bool()
    assert torch.allclose(own[mask], shared[mask], atol=1e-4), (own - shared)[mask].abs().max()
    generate_batch(model, tokenizer, QUESTIONS[:2], max_new_tokens=2)
    assert model.config._attn_implementation == "sdpa"


def test_a_row_stops_when_its_answer_is_decided(model, tokenizer):
    listings = [data.prompt_messages(e) for e in data.load_instruction_task("test")[:4]]
    full = generate_batch(model, tokenizer, listings, max_new_tokens=16)
    stopped = generate_batch(
        model, tokenizer, listings, max_new_tokens=16, stop_when=lambda text: len(text) > 0
    )
    for short, long in zip(stopped, full):
        assert short and long.startswith(short) and len(short) < len(long)
    with pytest.raises(TypeError, match="stop_when"):
        generate_batch(model, tokenizer, listings, stop_when="}")


def test_shared_prefix_length_leaves_every_row_a_token_of_its_own():
    assert shared_prefix_length([[1, 2, 3], [1, 2, 4]]) == 2
    assert shared_prefix_length([[1, 2], [1, 2, 3]]) == 1
    assert shared_prefix_length([[5, 2], [1, 2]]) == 0
    assert shared_prefix_length([]) == 0


@pytest.mark.parametrize(
    ("text", "decided"),
    [
        ("", False),
        ("The flat", False),  # prose: strict is lost, but lenient waits for a {...}
        ('The flat {"a": 1}', True),
        ('{"a": 1', False),
        ('{"a": 1} ', False),  # end-of-turn may still come: strict can still hold
        ('{"a": 1}\nThis flat', True),
        ('{"a": {"b": 1}}', False),
        ('{"a": {"b": 1}} x', True),
        ('{"a": "}"}', False),  # a brace inside a string closes nothing
        ('{"a": "\\"}"} z', True),
    ],
)
def test_json_answer_decided_only_when_more_tokens_cannot_change_the_score(text, decided):
    assert data.json_answer_decided(text) is decided


def test_scores_with_early_stopping_equal_scores_generated_to_the_budget(model, tokenizer):
    """evaluate_instruction stops rows early; exact and lenient match are those of full answers."""
    examples = data.load_instruction_task("test")[:6]
    result = data.evaluate_instruction(model, tokenizer, examples)
    full = generate_batch(
        model, tokenizer, [data.prompt_messages(e) for e in examples], max_new_tokens=56
    )
    for strict in (True, False):
        scores = [data.exact_match(p, r, strict) for p, r in zip(full, result["references"])]
        key = "exact_match" if strict else "lenient_match"
        assert result[key] == sum(scores) / len(scores)
    for short, long in zip(result["predictions"], full):
        assert long.startswith(short)


def test_generation_restores_the_tokenizer_and_model_state(model, tokenizer):
    tokenizer.padding_side = "right"
    model.train()
    generate_batch(model, tokenizer, QUESTIONS[:1], max_new_tokens=2)
    assert tokenizer.padding_side == "right" and model.training
    model.eval()


def test_as_messages_builds_chat_messages():
    assert as_messages("Hi") == [{"role": "user", "content": "Hi"}]
    with_system = as_messages("Hi", system="Be brief.")
    assert with_system[0] == {"role": "system", "content": "Be brief."}
    conversation = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    assert as_messages(conversation) == conversation


@pytest.mark.parametrize(
    ("prompt", "error", "message"),
    [("   ", ValueError, "prompt is empty"), (42, TypeError, "string or a list")],
)
def test_as_messages_rejects_bad_prompts(prompt, error, message):
    with pytest.raises(error, match=message):
        as_messages(prompt)


def test_generate_batch_rejects_bad_arguments(model, tokenizer):
    with pytest.raises(TypeError, match="use chat"):
        generate_batch(model, tokenizer, "one question")
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate_batch(model, tokenizer, ["Hi"], max_new_tokens=0)
    with pytest.raises(ValueError, match="batch_size"):
        generate_batch(model, tokenizer, ["Hi"], batch_size=0)
