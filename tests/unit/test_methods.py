"""Tests for course_utils.methods, the LoRA zoo, on a tiny random Llama with the course tokenizer.

Every count is checked against PEFT's own parameters (or hand arithmetic on the shapes), every
optimizer against what the paper says it must do, so the lesson's table rests on checked code.
"""

import math

import pytest
import torch

from course_tools import train
from course_utils import assets, data, delta_lora, methods


def tiny_model(tokenizer):
    """The tests' tiny Llama, with an MLP width unlike the attention's (shapes stay apart)."""
    return assets.tiny_llama(tokenizer, intermediate_size=96)


def trainable_names(model):
    return [n for n, p in model.named_parameters() if p.requires_grad]


# ------------------------------------------------------------------------------ the registry


def test_the_zoo_lists_the_eight_methods_with_their_papers():
    assert list(methods.METHODS) == [
        "lora",
        "rslora",
        "dora",
        "vera",
        "lora+",
        "lora-fa",
        "pissa",
        "delta-lora",
    ]
    for method in methods.METHODS.values():
        assert len(method.arxiv) == 10 and method.arxiv[4] == "."  # e.g. 2106.09685


@pytest.mark.parametrize(
    "call",
    [
        lambda: methods.make_adapter_config("qlora-xl"),
        lambda: methods.make_optimizer("LoRA", None),
        lambda: methods.make_callbacks("adalora", None),
        lambda: methods.trainable_parameter_formula("SmolLM2-135M", "lokr"),
    ],
)
def test_an_unknown_method_is_rejected_with_the_valid_names(call):
    with pytest.raises(ValueError, match="method must be one of") as error:
        call()
    assert all(repr(name) in str(error.value) for name in methods.METHODS)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"r": 0}, "r \\(the rank\\) must be a positive integer"),
        ({"r": 2.5}, "r \\(the rank\\) must be a positive integer"),
        ({"alpha": -1}, "alpha must be a positive number"),
        ({"target_modules": []}, "target_modules must be"),
        ({"target_modules": "q_proj"}, "target_modules must be"),
        ({"not_a_field": 1}, "pass only fields of LoraConfig"),
    ],
)
def test_make_adapter_config_rejects_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        methods.make_adapter_config("lora", **kwargs)


def test_make_adapter_config_sets_what_each_method_changes():
    from peft import LoraConfig, VeraConfig

    plain = methods.make_adapter_config("lora", r=8, alpha=16)
    assert isinstance(plain, LoraConfig) and not plain.use_rslora and not plain.use_dora
    assert (plain.r, plain.lora_alpha, plain.lora_dropout) == (8, 16, 0.0)
    assert methods.make_adapter_config("rslora").use_rslora
    assert methods.make_adapter_config("dora").use_dora
    assert methods.make_adapter_config("pissa").init_lora_weights.startswith("pissa")
    assert isinstance(methods.make_adapter_config("vera", r=32), VeraConfig)
    config = methods.make_adapter_config("delta-lora", update_ratio=0.5, start_steps=3)
    assert isinstance(config, delta_lora.DeltaLoRAConfig)
    assert (config.update_ratio, config.start_steps, config.scaling) == (0.5, 3, 2.0)
    assert methods.make_adapter_config("lora", lora_dropout=0.1).lora_dropout == 0.1
    with pytest.raises(ValueError, match="pass only fields of DeltaLoRAConfig"):
        methods.make_adapter_config("delta-lora", lora_dropout=0.1)


# ------------------------------------------------------------------------------ counts


def hand_count(method, config, r, names):
    """The trainable numbers, from the weight shapes of the tiny model, written out by hand."""
    h, inter, kv = 64, 96, 2 * 16  # kv heads x head_dim
    shapes = {  # name: (d_out, d_in)
        "q_proj": (h, h),
        "k_proj": (kv, h),
        "v_proj": (kv, h),
        "o_proj": (h, h),
        "gate_proj": (inter, h),
        "up_proj": (inter, h),
        "down_proj": (h, inter),
    }
    per_layer = {
        "vera": lambda o, i: o + r,
        "lora-fa": lambda o, i: r * o,
        "dora": lambda o, i: r * (o + i) + o,
    }.get(method, lambda o, i: r * (o + i))
    return config.num_hidden_layers * sum(per_layer(*shapes[n]) for n in names)


@pytest.mark.parametrize("method", list(methods.METHODS))
@pytest.mark.parametrize("targets", ["all-linear", ["q_proj", "v_proj"]])
def test_every_method_builds_and_trains_what_the_formula_says(tokenizer, method, targets):
    base = tiny_model(tokenizer)
    model = methods.apply_method(base, method, r=4, alpha=8, target_modules=targets)
    trainable, total = train.count_parameters(model)
    names = list(methods.memory.LLAMA_LINEAR_LAYERS) if targets == "all-linear" else targets
    formula = methods.trainable_parameter_formula(base.config, method, r=4, targets=targets)
    assert trainable == formula == hand_count(method, base.config, 4, names)
    assert 0 < trainable < total
    if method == "lora-fa":
        assert not any("lora_A" in n for n in trainable_names(model))
    if method == "vera":
        assert all("vera_lambda" in n for n in trainable_names(model))
    if method == "dora":
        assert any("magnitude" in n for n in trainable_names(model))


def test_apply_method_refuses_a_model_that_has_adapters_and_a_non_model(tokenizer):
    model = methods.apply_method(tiny_model(tokenizer), "lora", r=4)
    for method in ("dora", "delta-lora"):
        with pytest.raises(ValueError, match="already has adapters"):
            methods.apply_method(model, method, r=4)
    with pytest.raises(TypeError, match="transformers model"):
        methods.apply_method("model", "lora")


def test_trainable_parameter_formula_on_smollm2_from_its_shapes():
    # SmolLM2-135M, 30 layers; q, o: 576 -> 576; k, v: 576 -> 192; gate, up: 576 -> 1536; down back.
    lora = 30 * 16 * (2 * 1152 + 2 * 768 + 2 * 2112 + 2112)
    d_out = 30 * (576 + 192 + 192 + 576 + 1536 + 1536 + 576)
    assert methods.trainable_parameter_formula("SmolLM2-135M", "lora") == lora == 4_884_480
    assert methods.trainable_parameter_formula("SmolLM2-135M", "dora") == lora + d_out
    assert methods.trainable_parameter_formula("SmolLM2-135M", "lora-fa") == 16 * d_out
    assert methods.trainable_parameter_formula("SmolLM2-135M", "vera") == d_out + 30 * 7 * 16
    with pytest.raises(ValueError, match="unknown layer"):
        methods.trainable_parameter_formula("SmolLM2-135M", "lora", targets=["qkv"])
    with pytest.raises(ValueError, match="positive integer"):
        methods.trainable_parameter_formula("SmolLM2-135M", "lora", r=-1)


# ------------------------------------------------------------------------------ what changes


def peft_layer(model, name="q_proj"):
    """The PEFT layer wrapping the first decoder layer's `name`."""
    return model.get_base_model().model.layers[0].self_attn.get_submodule(name)


def test_rslora_scales_by_alpha_over_sqrt_r_and_lora_by_alpha_over_r(tokenizer):
    lora = methods.apply_method(tiny_model(tokenizer), "lora", r=4, alpha=8)
    rslora = methods.apply_method(tiny_model(tokenizer), "rslora", r=4, alpha=8)
    assert peft_layer(lora).scaling["default"] == 8 / 4
    assert peft_layer(rslora).scaling["default"] == 8 / math.sqrt(4)


def test_pissa_starts_from_the_top_singular_directions_and_keeps_w(tokenizer):
    base = tiny_model(tokenizer)
    w = base.model.layers[0].self_attn.q_proj.weight.detach().clone()
    model = methods.apply_method(base, "pissa", r=4, alpha=8)
    layer = peft_layer(model)
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    product = layer.scaling["default"] * b @ a
    # W = residual + s·B·A exactly, and s·B·A is (close to) W's best rank-4 approximation.
    assert torch.allclose(layer.base_layer.weight + product, w, atol=1e-5)
    top = torch.linalg.svdvals(w)[:4]
    assert torch.allclose(torch.linalg.svdvals(product)[:4], top, rtol=0.05)


def test_make_optimizer_is_none_where_adamw_is_the_method(tokenizer):
    for method in ("lora", "rslora", "dora", "vera", "pissa", "delta-lora"):
        model = methods.apply_method(tiny_model(tokenizer), method, r=4)
        assert methods.make_optimizer(method, model, 1e-3) is None


def test_loraplus_gives_b_ratio_times_the_learning_rate_of_a(tokenizer):
    model = methods.apply_method(tiny_model(tokenizer), "lora+", r=4)
    optimizer = methods.make_optimizer("lora+", model, 2e-4, loraplus_lr_ratio=8)
    rate = {id(p): group["lr"] for group in optimizer.param_groups for p in group["params"]}
    named = dict(model.named_parameters())
    a = [id(p) for n, p in named.items() if "lora_A" in n]
    b = [id(p) for n, p in named.items() if "lora_B" in n]
    assert len(a) == len(b) == 2 * 7
    assert all(rate[i] == 2e-4 for i in a)
    assert all(rate[i] == pytest.approx(8 * 2e-4) for i in b)


def test_lorafa_keeps_a_at_its_init_and_moves_b(tokenizer):
    model = methods.apply_method(tiny_model(tokenizer), "lora-fa", r=4)
    optimizer = methods.make_optimizer("lora-fa", model, 1e-2)
    assert type(optimizer).__name__ == "LoraFAOptimizer"
    layer = peft_layer(model)
    a0 = layer.lora_A["default"].weight.detach().clone()
    features = [data.tokenize_with_assistant_mask(tokenizer, e) for e in examples()[:2]]
    batch = data.pad_batch(features, tokenizer.pad_token_id)
    model(**batch).loss.backward()
    optimizer.step()
    assert torch.equal(layer.lora_A["default"].weight, a0)
    assert layer.lora_B["default"].weight.abs().sum() > 0  # B left zero


def examples():
    return data.load_instruction_task("train")[:8]


def test_make_optimizer_rejects_bad_arguments(tokenizer):
    model = methods.apply_method(tiny_model(tokenizer), "lora+", r=4)
    with pytest.raises(ValueError, match="loraplus_lr_ratio must be a number >= 1"):
        methods.make_optimizer("lora+", model, 1e-3, loraplus_lr_ratio=0.5)
    with pytest.raises(ValueError, match="learning_rate must be a positive number"):
        methods.make_optimizer("lora+", model, 0)
    with pytest.raises(ValueError, match="needs the PEFT model"):
        methods.make_optimizer("lora-fa", tiny_model(tokenizer), 1e-3)


def test_make_callbacks_gives_delta_lora_its_hook_and_nothing_to_the_rest(tokenizer):
    from transformers import TrainerCallback

    model = methods.apply_method(tiny_model(tokenizer), "delta-lora", r=4)
    (callback,) = methods.make_callbacks("delta-lora", model)
    assert isinstance(callback, TrainerCallback)
    assert methods.make_callbacks("dora", model) == []


# ------------------------------------------------------------------------------ training


@pytest.mark.parametrize("method", ["lora+", "lora-fa", "delta-lora", "vera"])
def test_train_method_trains_through_train_train(tokenizer, method):
    model = methods.apply_method(tiny_model(tokenizer), method, r=4, alpha=8)
    trained = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    q = next(m for n, m in model.named_modules() if n.endswith("layers.0.self_attn.q_proj"))
    w = q.base_layer.weight if hasattr(q, "base_layer") else q.base.weight
    w0 = w.detach().clone()
    result = train.train_method(
        model,
        tokenizer,
        examples(),
        method=method,
        steps=3,
        batch_size=4,
        learning_rate=1e-2,
        progress_bar=False,
        live_plot=False,
    )
    assert result.label == method and len(result.losses) == 3
    assert all(math.isfinite(x) for x in result.losses)
    now = dict(model.named_parameters())
    assert all(not torch.equal(now[n], before) for n, before in trained.items())
    # Only Delta-LoRA moves the frozen pretrained weight (t = 1 and 2 are > K = 0).
    assert torch.equal(w, w0) == (method != "delta-lora")
