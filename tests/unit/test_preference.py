"""Tests for course_utils.preference: the shipped pairs, log-probs, implicit rewards, TRL agreement.

Log-probs are checked against a token-by-token computation written here; margin, accuracy and
loss against TRL's own DPOTrainer.evaluate() on a tiny random Llama with the course tokenizer.
"""

import json
import math
import random

import pytest
import torch

from course_tools import datasets, train
from course_utils import assets, data, preference


@pytest.fixture(scope="module")
def pairs():
    return preference.load_preference_pairs("test")[:6]


# ------------------------------------------------------------------------------ the data set


def test_rebuilding_gives_the_shipped_files_byte_for_byte(tmp_path):
    written = datasets.write_preference_files(tmp_path)
    assert sorted(written) == ["rentals_preference_test.jsonl", "rentals_preference_train.jsonl"]
    for name, path in written.items():
        assert path.read_bytes() == (data.DATA_DIR / name).read_bytes(), name
    assert preference.build_preference_pairs(seed=1)["train"] != preference.load_preference_pairs()


def test_the_manifest_records_the_preference_files():
    manifest = json.loads((data.DATA_DIR / data.MANIFEST).read_text())
    for split in ("train", "test"):
        name = f"rentals_preference_{split}.jsonl"
        pairs = preference.load_preference_pairs(split)
        assert manifest["files"][name]["examples"] == len(pairs)
        assert manifest["files"][name]["sha256"] == datasets.file_digest(data.DATA_DIR / name)


@pytest.mark.parametrize("split", ["train", "test"])
def test_chosen_is_the_reference_and_rejected_breaks_one_rule(split):
    rentals = data.load_instruction_task(split)
    pairs = preference.load_preference_pairs(split)
    assert len(pairs) == len(rentals)
    for pair, example in zip(pairs, rentals):
        assert pair["prompt"] == data.prompt_messages(example)
        chosen = pair["chosen"][0]["content"]
        rejected = pair["rejected"][0]["content"]
        assert chosen == data.reference_answer(example)
        truth = json.loads(chosen)
        if pair["mistake"] == "prose_around":
            assert data.parse_json_answer(rejected) is None  # not JSON only ...
            assert data.parse_json_answer(rejected, strict=False) == truth  # ... but right inside
            continue
        wrong = json.loads(rejected)
        changed = [key for key in truth if wrong[key] != truth[key]]
        assert list(wrong) == list(truth) and len(changed) == 1, (chosen, rejected)
        key = changed[0]
        listing = pair["prompt"][-1]["content"]
        if pair["mistake"] in ("type_as_written", "city_as_written"):
            assert str(wrong[key]).lower() in listing.lower()  # copied from the listing
        if pair["mistake"] == "wrong_period":
            assert {wrong[key], truth[key]} == {"week", "month"}


def test_held_out_pairs_come_from_listings_never_trained_on():
    train_users = {p["prompt"][-1]["content"] for p in preference.load_preference_pairs("train")}
    test_users = {p["prompt"][-1]["content"] for p in preference.load_preference_pairs("test")}
    assert len(test_users) == 100 and not train_users & test_users


def test_every_mistake_is_used_and_only_where_it_applies():
    pairs = preference.load_preference_pairs("train")
    assert {p["mistake"] for p in pairs} == set(preference.MISTAKES)
    studio = {
        "bedrooms": 0,
        "type": "studio",
        "city": "York",
        "rent_gbp": 500,
        "rent_period": "week",
    }
    listing = "Cosy studio in York, £500 pw."
    assert "bedrooms_as_word" not in preference.applicable_mistakes(listing, studio)
    assert "city_as_written" not in preference.applicable_mistakes(listing, studio)
    with pytest.raises(ValueError, match="does not apply"):
        preference.make_rejected(listing, studio, "bedrooms_as_word", random.Random(0))
    with pytest.raises(ValueError, match="mistake must be one of"):
        preference.make_rejected(listing, studio, "typo", random.Random(0))
    wrong = preference.make_rejected(listing, studio, "period_as_written", random.Random(0))
    assert json.loads(wrong)["rent_period"] == "pw"


def test_bad_pairs_and_files_are_refused(tmp_path):
    good = preference.load_preference_pairs("test")[0]
    with pytest.raises(ValueError, match='missing the "rejected" key'):
        preference.write_pairs(
            tmp_path / "x.jsonl", [{"prompt": good["prompt"], "chosen": good["chosen"]}]
        )
    with pytest.raises(ValueError, match="the same answer"):
        preference.write_pairs(tmp_path / "x.jsonl", [{**good, "rejected": good["chosen"]}])
    bad = tmp_path / "bad.jsonl"
    bad.write_text("{not json\n")
    with pytest.raises(ValueError, match="line 1: bad JSON"):
        preference.read_pairs(bad)
    with pytest.raises(FileNotFoundError):
        preference.read_pairs(tmp_path / "missing.jsonl")
    with pytest.raises(ValueError, match="split must be one of"):
        preference.load_preference_pairs("validation")
    with pytest.raises(ValueError, match="seed must be an integer"):
        preference.build_preference_pairs(seed="0")
    columns = preference.to_dataset([good]).column_names
    assert columns == ["prompt", "chosen", "rejected"]


# ------------------------------------------------------------------------------ log-probs


def hand_logp(model, tokenizer, pair, which):
    """log π(answer | prompt) one token at a time from the rendered text (independent of the module)."""
    prompt_text = tokenizer.apply_chat_template(
        pair["prompt"], tokenize=False, add_generation_prompt=True
    )
    full_text = tokenizer.apply_chat_template(pair["prompt"] + pair[which], tokenize=False)
    assert full_text.startswith(prompt_text)
    ids = tokenizer(full_text, add_special_tokens=False)["input_ids"]
    n_prompt = len(tokenizer(prompt_text, add_special_tokens=False)["input_ids"])
    total = 0.0
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].double()
    for position in range(n_prompt, len(ids)):
        probs = torch.softmax(logits[position - 1], dim=-1)
        total += math.log(probs[ids[position]].item())
    return total


def test_completion_logps_match_a_token_by_token_computation(tokenizer, pairs):
    model = assets.tiny_llama(tokenizer).eval()
    for which in ("chosen", "rejected"):
        batched = preference.completion_logps(
            model, tokenizer, [p["prompt"] for p in pairs], [p[which] for p in pairs], batch_size=4
        )
        expected = torch.tensor(
            [hand_logp(model, tokenizer, p, which) for p in pairs], dtype=torch.float64
        )
        torch.testing.assert_close(batched.double(), expected, atol=1e-3, rtol=1e-5)


def test_rewards_loss_and_a_policy_that_is_its_own_reference():
    policy = torch.tensor([-3.0, -5.0])
    reference = torch.tensor([-4.0, -4.0])
    torch.testing.assert_close(
        preference.implicit_rewards(policy, reference, beta=0.5), torch.tensor([0.5, -0.5])
    )
    # margins 0.1·((−3+4) − (−5+4)) = 0.2 and 0.1·((−5+4) − (−3+4)) = −0.2
    loss = preference.dpo_loss(policy, policy.flip(0), reference, reference, beta=0.1)
    expected = (math.log1p(math.exp(-0.2)) + math.log1p(math.exp(0.2))) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    with pytest.raises(ValueError, match="beta must be a positive number"):
        preference.implicit_rewards(policy, reference, beta=0)
    with pytest.raises(ValueError, match="same shape"):
        preference.implicit_rewards(policy, reference[:1], beta=0.1)


def test_before_training_every_margin_is_zero_but_the_log_prob_preference_is_not(tokenizer, pairs):
    model = assets.tiny_llama(tokenizer)
    report = preference.preference_report(model, tokenizer, pairs, beta=0.1)
    assert torch.equal(report["margins"], torch.zeros(len(pairs)))
    assert report["accuracy"] == 0.0 and report["loss"] == pytest.approx(math.log(2))
    raw = report["policy_chosen_logps"] - report["policy_rejected_logps"]
    assert report["logp_preference"] == pytest.approx(raw.mean().item())
    assert report["logp_preference"] != 0.0


def test_bad_arguments_are_refused(tokenizer, pairs):
    model = assets.tiny_llama(tokenizer)
    with pytest.raises(ValueError, match="pairs must be a non-empty list"):
        preference.preference_report(model, tokenizer, [])
    with pytest.raises(ValueError, match="beta must be a positive number"):
        preference.preference_report(model, tokenizer, pairs, beta=-1)
    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        preference.completion_logps(
            model, tokenizer, [pairs[0]["prompt"]], [pairs[0]["chosen"]], batch_size=0
        )
    with pytest.raises(ValueError, match="same length"):
        preference.completion_logps(model, tokenizer, [pairs[0]["prompt"]], [])
    with pytest.raises(ValueError, match="No DPO training steps"):
        preference.training_curves([{"train_runtime": 1.0}])


# ------------------------------------------------------------------------------ TRL agreement


def test_margin_accuracy_and_loss_agree_with_trl_after_training(tokenizer, pairs, tmp_path):
    pytest.importorskip("trl")
    train_pairs = preference.load_preference_pairs("train")[:8]
    trainer = preference.dpo_trainer(
        assets.tiny_llama(tokenizer),
        tokenizer,
        train_pairs,
        steps=3,
        batch_size=4,
        learning_rate=5e-3,
        beta=0.1,
        lora=train.lora_config(r=4),
        eval_pairs=pairs,
        output_dir=tmp_path / "dpo",
    )
    trainer.args.per_device_eval_batch_size = len(pairs)  # one eval batch: TRL's mean is exact
    trainer.args.disable_tqdm = True
    trainer.train()
    curves = preference.training_curves(trainer.state.log_history)
    assert curves["step"] == [1.0, 2.0, 3.0]
    assert curves["rewards/margins"][0] == pytest.approx(0.0, abs=1e-6)  # policy == reference
    assert curves["loss"][0] == pytest.approx(math.log(2), abs=1e-5)

    trl_metrics = trainer.evaluate()
    ours = preference.preference_report(trainer.model, tokenizer, pairs, beta=0.1)
    assert ours["margin"] != 0.0  # the adapter moved the policy away from the reference
    assert ours["margin"] == pytest.approx(trl_metrics["eval_rewards/margins"], abs=1e-5)
    assert ours["accuracy"] == pytest.approx(trl_metrics["eval_rewards/accuracies"], abs=1e-6)
    assert ours["loss"] == pytest.approx(trl_metrics["eval_loss"], abs=1e-5)
    mean_chosen = ours["policy_chosen_logps"].mean().item()
    assert mean_chosen == pytest.approx(trl_metrics["eval_logps/chosen"], abs=1e-3)


def test_dpo_trainer_refuses_a_model_that_already_has_an_adapter(tokenizer, pairs):
    peft_model = train.prepare_model(
        assets.tiny_llama(tokenizer), "lora", lora=train.lora_config(r=4)
    )
    with pytest.raises(ValueError, match="Pass the base model"):
        preference.dpo_trainer(peft_model, tokenizer, pairs, steps=1)
    with pytest.raises(ValueError, match="steps must be a positive integer"):
        preference.dpo_trainer(assets.tiny_llama(tokenizer), tokenizer, pairs, steps=0)
