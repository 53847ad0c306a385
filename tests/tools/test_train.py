"""Tests for course_tools.train and course_utils.evaluate on a tiny random Llama (seconds, not minutes).

The tiny model has the course tokenizer's vocabulary, so the real chat template, the real
assistant-only labels and TRL's real SFTTrainer all run; the labs run the same code on SmolLM2.
"""

import importlib.util
import warnings

import pytest
import torch

from course_tools import train
from course_utils import assets, data, env, evaluate, memory


@pytest.fixture(scope="module")
def examples():
    return data.load_instruction_task("train")[:8]


# ------------------------------------------------------------------------------ lora_config


def test_lora_config_defaults_alpha_to_twice_the_rank():
    config = train.lora_config(r=8)
    assert config.r == 8 and config.lora_alpha == 16 and config.target_modules == "all-linear"


@pytest.mark.parametrize("r", [0, -4, 2.5, True, "16"])
def test_lora_config_rejects_a_rank_that_is_not_a_positive_integer(r):
    with pytest.raises(ValueError, match="r \\(the LoRA rank\\) must be a positive integer"):
        train.lora_config(r=r)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"alpha": 0}, "alpha must be a positive number"),
        ({"dropout": 1.0}, "dropout must be in"),
        ({"target_modules": []}, "target_modules"),
        ({"target_modules": ["q_proj", ""]}, "layer names"),
    ],
)
def test_lora_config_rejects_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        train.lora_config(**kwargs)


# ------------------------------------------------------------------------------ prepare_model


def test_prepare_model_lora_trains_exactly_the_formula(tokenizer):
    model = train.prepare_model(assets.tiny_llama(tokenizer), "lora", lora=train.lora_config(r=4))
    trainable, total = train.count_parameters(model)
    assert trainable == memory.lora_trainable_params(model.config, r=4, targets="all-linear")
    assert 0 < trainable < total
    assert all("lora_" in n for n, p in model.named_parameters() if p.requires_grad)


def test_prepare_model_full_trains_everything(tokenizer):
    model = assets.tiny_llama(tokenizer)
    for p in model.parameters():
        p.requires_grad_(False)
    model = train.prepare_model(model, "full")
    trainable, total = train.count_parameters(model)
    assert trainable == total == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("method", ["full", "lora", "qlora"])
def test_gradient_checkpointing_recomputes_layers_without_torchs_warning(tokenizer, method):
    # torch warns when use_reentrant is left out (lab 07 showed it under its QLoRA run)
    model = _tiny_nf4(tokenizer) if method == "qlora" else assets.tiny_llama(tokenizer)
    model = train.prepare_model(model, method, gradient_checkpointing=True)
    ids = torch.arange(12).reshape(2, 6)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model(input_ids=ids, labels=ids).loss.backward()
    assert not [w for w in caught if "use_reentrant" in str(w.message)]
    causal_lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    assert causal_lm.is_gradient_checkpointing


def test_prepare_model_rejects_unknown_methods_and_wrong_bases(tokenizer):
    with pytest.raises(ValueError, match="'full', 'lora', 'qlora'"):
        train.prepare_model(assets.tiny_llama(tokenizer), "dora")
    with pytest.raises(ValueError, match="quantization='nf4'"):
        train.prepare_model(assets.tiny_llama(tokenizer), "qlora")
    wrapped = train.prepare_model(assets.tiny_llama(tokenizer), "lora")
    with pytest.raises(ValueError, match="already has adapters"):
        train.prepare_model(wrapped, "lora")
    with pytest.raises(TypeError):
        train.prepare_model("model", "lora")


def test_asking_for_4bit_without_bitsandbytes_says_how_to_install_it(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "bitsandbytes" else real(name, *a),
    )
    with pytest.raises(assets.CourseAssetError, match="pip install 'bitsandbytes"):
        assets.load_model(quantization="nf4", source="offline")


def _tiny_nf4(tokenizer):
    """The tiny Llama loaded in NF4 by transformers + bitsandbytes, as a learner might load it."""
    from course_tools.bench.common import tiny_model as _tiny_model

    return _tiny_model(torch.float32, torch.device("cpu"), True, vocab_size=len(tokenizer))


def _qlora_losses(tokenizer, examples, evaluate_first):
    model = _tiny_nf4(tokenizer)
    if evaluate_first:  # what lab 06 does: score the 4-bit model, then train it
        assets.keep_trainable_4bit_layout(model)  # load_model(quantization="nf4") does this
        with torch.no_grad():
            model.eval()(torch.tensor([[1, 2, 3]]))
    model = train.prepare_model(model, "qlora", lora=train.lora_config(r=4))
    run = train.train(
        model, tokenizer, examples, method="qlora", steps=3, batch_size=2, live_plot=False
    )
    return run.losses


def test_a_4bit_model_evaluated_first_trains_exactly_like_a_fresh_one(tokenizer, examples):
    # bitsandbytes would repack the weights for CPU inference on that first no-grad forward
    # (on AVX512-BF16 CPUs), after which QLoRA stopped learning in lab 06
    assert _qlora_losses(tokenizer, examples, True) == _qlora_losses(tokenizer, examples, False)


def _repacks_for_inference() -> bool:
    """Say whether bitsandbytes' CPU inference repacking happens on this machine."""
    if importlib.util.find_spec("bitsandbytes") is None:
        return False
    from bitsandbytes.functional import has_avx512bf16

    return bool(has_avx512bf16())


@pytest.mark.skipif(
    not _repacks_for_inference(),
    reason="bitsandbytes repacks 4-bit weights for inference only on CPUs with AVX512-BF16",
)
def test_prepare_model_refuses_4bit_weights_repacked_for_inference(tokenizer):
    model = _tiny_nf4(tokenizer)
    with torch.no_grad():
        model.eval()(torch.tensor([[1, 2, 3]]))  # the flag is still on: bitsandbytes repacks
    assert assets.has_cpu_inference_layout(model)
    with pytest.raises(ValueError, match="load it again"):
        train.prepare_model(model, "qlora")


# ------------------------------------------------------------------------------ data and training


def test_chat_dataset_keeps_the_assistant_only_labels(tokenizer, examples):
    dataset = train.chat_dataset(tokenizer, examples)
    expected = data.tokenize_with_assistant_mask(tokenizer, examples[0], max_length=512)
    assert dataset[0]["input_ids"] == expected["input_ids"]
    assert dataset[0]["labels"] == expected["labels"]
    assert data.IGNORE_INDEX in dataset[0]["labels"]
    with pytest.raises(ValueError, match="non-empty list"):
        train.chat_dataset(tokenizer, [])
    with pytest.raises(ValueError, match="no assistant turn"):
        train.chat_dataset(tokenizer, [{"messages": [{"role": "user", "content": "Hi"}]}])


def test_train_lowers_the_loss_and_records_what_it_measured(tokenizer, examples):
    model = train.prepare_model(assets.tiny_llama(tokenizer), "lora", lora=train.lora_config(r=8))
    result = train.train(
        model,
        tokenizer,
        examples,
        method="lora",
        steps=6,
        batch_size=4,
        learning_rate=1e-2,
        measure_memory=True,
        progress_bar=False,
    )
    assert len(result.losses) == len(result.step_seconds) == 6
    assert result.final_loss < result.first_loss, result.losses
    n_tokens = sum(len(ids) for ids in train.chat_dataset(tokenizer, examples)["input_ids"])
    assert result.tokens == 3 * n_tokens  # 6 steps x 4 = 24 examples = 3 passes over 8
    assert result.tokens_per_second > 0 and result.seconds > 0
    assert result.peak_memory > memory.measure_model_bytes(model)
    assert set(result.summary()) >= {"run", "trainable params", "s/step", "tokens/s", "peak MB"}


def test_train_rejects_bad_budgets_and_untrainable_models(tokenizer, examples):
    model = train.prepare_model(assets.tiny_llama(tokenizer), "lora")
    with pytest.raises(ValueError, match="steps must be a positive integer"):
        train.train(model, tokenizer, examples, method="lora", steps=0)
    with pytest.raises(ValueError, match="learning_rate must be a positive number"):
        train.train(model, tokenizer, examples, method="lora", steps=1, learning_rate=-1)
    frozen = assets.tiny_llama(tokenizer)
    for p in frozen.parameters():
        p.requires_grad_(False)
    with pytest.raises(ValueError, match="prepare_model"):
        train.train(frozen, tokenizer, examples, method="full", steps=1)
    with pytest.raises(ValueError, match="loss_type must be one of"):
        train.train(model, tokenizer, examples, method="lora", steps=1, loss_type="dft")


def test_the_three_losses_give_the_same_losses(tokenizer, examples):
    """TRL's chunked_nll (the default), plain nll and the course's fused head: one cross-entropy.

    The second loss comes after one AdamW step, so it also checks the gradients agree.
    """
    firsts = {}
    for loss_type in train.LOSS_TYPES:
        env.seed_everything(0)
        model = train.prepare_model(
            assets.tiny_llama(tokenizer), "lora", lora=train.lora_config(r=4)
        )
        run = train.train(
            model,
            tokenizer,
            examples,
            method="lora",
            steps=2,
            batch_size=4,
            progress_bar=False,
            loss_type=loss_type,
        )
        firsts[loss_type] = run.losses
    assert firsts["fused"] == pytest.approx(firsts["nll"], rel=1e-4)
    assert firsts["chunked_nll"] == pytest.approx(firsts["nll"], rel=1e-4)


def test_the_course_swiglu_trains_to_the_same_losses_and_can_be_left_off(tokenizer, examples):
    """train(fused_mlp=True) puts course_utils.swiglu on every MLP; False (the default) takes it off."""
    losses, patched = {}, {}
    for fused_mlp in (True, False):
        env.seed_everything(0)
        model = train.prepare_model(
            assets.tiny_llama(tokenizer), "lora", lora=train.lora_config(r=4)
        )
        run = train.train(
            model,
            tokenizer,
            examples,
            method="lora",
            steps=2,
            batch_size=4,
            progress_bar=False,
            fused_mlp=fused_mlp,
        )
        losses[fused_mlp] = run.losses
        layers = model.get_base_model().model.layers
        patched[fused_mlp] = ["forward" in vars(layer.mlp) for layer in layers]
    assert patched == {True: [True, True], False: [False, False]}
    assert losses[True] == pytest.approx(losses[False], rel=1e-6)
    with pytest.raises(TypeError, match="fused_mlp must be True or False"):
        train.train(model, tokenizer, examples, method="lora", steps=1, fused_mlp="yes")


def test_train_uses_the_given_optimizer_and_runs_extra_callbacks(tokenizer, examples):
    from transformers import TrainerCallback

    class CountSteps(TrainerCallback):
        def __init__(self):
            self.steps = 0

        def on_optimizer_step(self, args, state, control, **kwargs):
            self.steps += 1

    model = train.prepare_model(assets.tiny_llama(tokenizer), "lora", lora=train.lora_config(r=4))
    trainable = [p for p in model.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in trainable]
    counter = CountSteps()
    # SGD at learning rate 0 moves nothing; the trainer's own AdamW at 1e-2 would.
    frozen_sgd = torch.optim.SGD(trainable, lr=0.0)
    train.train(
        model,
        tokenizer,
        examples,
        method="lora",
        steps=3,
        batch_size=4,
        learning_rate=1e-2,
        progress_bar=False,
        optimizer=frozen_sgd,
        callbacks=[counter],
    )
    assert counter.steps == 3
    assert all(torch.equal(a, b) for a, b in zip(before, trainable))


def test_train_rejects_a_bad_optimizer_or_callbacks(tokenizer, examples):
    model = train.prepare_model(assets.tiny_llama(tokenizer), "lora")
    with pytest.raises(TypeError, match="optimizer must be a torch.optim.Optimizer"):
        train.train(model, tokenizer, examples, method="lora", steps=1, optimizer="adamw")
    with pytest.raises(TypeError, match="TrainerCallback"):
        train.train(model, tokenizer, examples, method="lora", steps=1, callbacks=[print])


# ------------------------------------------------------------------------------ evaluate


def test_perplexity_is_exp_of_the_model_loss_and_short_text_is_rejected(tokenizer):
    model = assets.tiny_llama(tokenizer)
    texts = data.load_python_reference("validation")
    ppl = evaluate.perplexity(model, tokenizer, texts, block_size=32, max_blocks=2, batch_size=2)
    ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    blocks = torch.tensor(data.group_texts(ids, 32, tokenizer.eos_token_id)["input_ids"][:2])
    with torch.no_grad():
        loss = model(input_ids=blocks, labels=blocks).loss
    assert ppl == pytest.approx(torch.exp(loss).item(), rel=1e-4)
    assert ppl > len(tokenizer) / 10  # a random model is nearly uniform over the vocabulary
    with pytest.raises(ValueError, match="shorter than one block"):
        evaluate.perplexity(model, tokenizer, ["too short"], block_size=128)
    with pytest.raises(ValueError, match="non-empty list"):
        evaluate.perplexity(model, tokenizer, "a string, not a list")


def test_answer_loss_averages_over_assistant_tokens_only(tokenizer, examples):
    model = assets.tiny_llama(tokenizer)
    batch = data.pad_batch([data.tokenize_with_assistant_mask(tokenizer, examples[0])], 0)
    with torch.no_grad():
        expected = model(**batch).loss.item()
    assert evaluate.answer_loss(model, tokenizer, examples[:1]) == pytest.approx(expected, rel=1e-5)


def test_max_logit_difference_is_zero_for_the_same_weights_and_not_for_others(tokenizer):
    a, b = assets.tiny_llama(tokenizer), assets.tiny_llama(tokenizer)
    prompts = ["A flat in Leeds.", "A two-bed house to rent in York for £900 pcm."]
    assert evaluate.max_logit_difference(a, b, tokenizer, prompts) == 0.0
    with torch.no_grad():
        b.lm_head.weight.add_(0.1)
    assert evaluate.max_logit_difference(a, b, tokenizer, prompts) > 0.01
    with pytest.raises(ValueError):
        evaluate.max_logit_difference(a, b, tokenizer, [])


def test_field_accuracy_scores_each_key_and_side_by_side_makes_a_table(examples):
    references = [data.reference_answer(e) for e in examples[:2]]
    wrong_city = references[1].replace(data.parse_json_answer(references[1])["city"], "Atlantis")
    fields = evaluate.field_accuracy([references[0], wrong_city], references)
    assert fields["city"] == 0.5 and fields["bedrooms"] == 1.0
    assert evaluate.field_accuracy(["no json here", references[1]], references)["type"] == 0.5
    table = evaluate.side_by_side(examples, {"model": references}, n=2).splitlines()
    assert len(table) == 4 and table[0] == "| input | model | reference |"
    with pytest.raises(ValueError, match="same length"):
        evaluate.field_accuracy(references, references[:1])


def test_folder_size_adds_up_files_and_names_a_missing_folder(tmp_path):
    (tmp_path / "a.bin").write_bytes(b"x" * 100)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.bin").write_bytes(b"y" * 23)
    assert evaluate.folder_size(tmp_path) == 123
    with pytest.raises(FileNotFoundError, match="save the model"):
        evaluate.folder_size(tmp_path / "missing")


def test_wilson_interval_matches_the_textbook_values():
    low, high = evaluate.wilson_interval(8, 10)  # Wilson 1927; e.g. Newcombe 1998, table I
    assert (round(low, 3), round(high, 3)) == (0.49, 0.943)
    assert evaluate.wilson_interval(0, 20)[0] == 0.0 and evaluate.wilson_interval(20, 20)[1] == 1.0
    low, high = evaluate.wilson_interval(32, 40)
    assert low < 0.8 < high and high - low < 0.3
    with pytest.raises(ValueError, match="successes <= n"):
        evaluate.wilson_interval(5, 4)
    with pytest.raises(ValueError, match="non-negative integer"):
        evaluate.wilson_interval(-1, 4)
