"""course_utils.generation: chat and left-padded batches give the same greedy answers."""

import pytest

from course_utils.generation import as_messages, chat, generate_batch

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
