"""Tests for course_utils.lora: the from-scratch LoRA must behave exactly like PEFT's."""

import copy
import math

import pytest
import torch
from peft import LoraConfig, get_peft_model
from peft.tuners.lora import LoraLayer
from torch import nn
from transformers import LlamaForCausalLM

from course_utils import assets
from course_utils.lora import (
    LoRALinear,
    copy_lora_weights_to_peft,
    count_trainable_parameters,
    first_step_update_norm,
    inject_lora,
    lora_parameter_count,
    lora_parameter_table,
    lora_scaling,
    merge_lora,
    unmerge_lora,
)

TARGETS = ["q_proj", "v_proj"]
R, ALPHA = 4, 8


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    """A 2-layer Llama built from a config, no download; eval mode, float32."""
    return assets.tiny_llama(
        seed=seed,
        vocab_size=128,
        num_key_value_heads=4,
        max_position_embeddings=64,
        tie_word_embeddings=False,
        attn_implementation="eager",
    ).eval()


@pytest.fixture(scope="module")
def base_model() -> LlamaForCausalLM:
    """One tiny model per module; tests deep-copy it before changing anything."""
    return tiny_llama()


@pytest.fixture(scope="module")
def input_ids() -> torch.Tensor:
    """A small batch of token ids."""
    return torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(1))


def logits(model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """Logits of the model, without gradients."""
    with torch.no_grad():
        return model(input_ids=input_ids).logits


def randomize_lora(model: nn.Module, seed: int = 123) -> None:
    """Give every LoRALinear random, non-zero A and B so the adapter changes the output."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, LoRALinear):
                module.lora_A.copy_(0.2 * torch.randn(module.lora_A.shape, generator=generator))
                module.lora_B.copy_(0.2 * torch.randn(module.lora_B.shape, generator=generator))


def peft_and_ours(base_model: nn.Module, use_rslora: bool):
    """The same tiny model adapted by PEFT and by inject_lora, with identical A and B."""
    config = LoraConfig(
        r=R,
        lora_alpha=ALPHA,
        target_modules=TARGETS,
        lora_dropout=0.0,
        use_rslora=use_rslora,
        init_lora_weights=False,
    )
    peft_model = get_peft_model(copy.deepcopy(base_model), config).eval()
    ours = copy.deepcopy(base_model)
    names = inject_lora(ours, TARGETS, r=R, alpha=ALPHA, use_rslora=use_rslora)
    randomize_lora(ours)

    peft_layers = {
        n: m for n, m in peft_model.get_base_model().named_modules() if isinstance(m, LoraLayer)
    }
    assert sorted(peft_layers) == sorted(names)
    with torch.no_grad():
        for name in names:
            mine, theirs = ours.get_submodule(name), peft_layers[name]
            assert math.isclose(theirs.scaling["default"], mine.scaling)
            theirs.lora_A["default"].weight.copy_(mine.lora_A)
            theirs.lora_B["default"].weight.copy_(mine.lora_B)
    return peft_model, ours, names


# -----------------------------------------------------------------------------
# Same outputs as PEFT


@pytest.mark.parametrize("use_rslora", [False, True])
def test_matches_peft_logits(base_model, input_ids, use_rslora):
    peft_model, ours, names = peft_and_ours(base_model, use_rslora)
    assert len(names) == 2 * 2  # q_proj and v_proj in each of the two layers

    expected, got, base = (logits(m, input_ids) for m in (peft_model, ours, base_model))
    # The test only means something if the adapter really changes the output.
    assert (got - base).abs().max() > 1e-3
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)


def test_rslora_scaling_differs_from_plain():
    layer = LoRALinear(nn.Linear(8, 8), r=16, alpha=32)
    rs_layer = LoRALinear(nn.Linear(8, 8), r=16, alpha=32, use_rslora=True)
    assert layer.scaling == 2.0
    assert rs_layer.scaling == 8.0


def test_trainable_count_matches_formula_and_peft(base_model):
    peft_model, ours, names = peft_and_ours(base_model, use_rslora=False)
    expected = sum(
        lora_parameter_count(m.out_features, m.in_features, R)
        for m in (ours.get_submodule(n) for n in names)
    )
    trainable, total = count_trainable_parameters(ours)
    assert trainable == expected == 4 * R * (64 + 64)
    assert (trainable, total) == count_trainable_parameters(peft_model)
    base_total = sum(p.numel() for p in base_model.parameters())
    assert total == base_total + trainable


def test_lora_parameter_count():
    assert lora_parameter_count(576, 576, 8) == 9216
    assert lora_parameter_count(1536, 576, 4) == 4 * (576 + 1536)
    with pytest.raises(ValueError, match="d_in must be a positive integer"):
        lora_parameter_count(10, 0, 4)


# -----------------------------------------------------------------------------
# Initialisation, merge, rank


def test_init_output_equals_base_exactly(base_model, input_ids):
    model = copy.deepcopy(base_model)
    inject_lora(model, TARGETS, r=R, alpha=ALPHA)
    layer = model.get_submodule("model.layers.0.self_attn.q_proj")
    assert torch.count_nonzero(layer.lora_B) == 0
    assert torch.count_nonzero(layer.lora_A) > 0
    assert torch.equal(logits(model, input_ids), logits(base_model, input_ids))


def test_a_init_matches_nn_linear_bounds():
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(100, 30), r=8)
    bound = 1 / math.sqrt(100)  # kaiming_uniform(a=sqrt(5)) == U(-1/sqrt(fan_in), 1/sqrt(fan_in))
    assert layer.lora_A.abs().max() <= bound
    assert layer.lora_A.abs().max() > 0.9 * bound


def test_merge_keeps_outputs_and_unmerge_restores_weights(base_model, input_ids):
    model = copy.deepcopy(base_model)
    names = inject_lora(model, TARGETS, r=R, alpha=ALPHA)
    randomize_lora(model)
    before = {n: model.get_submodule(n).base.weight.clone() for n in names}
    unmerged_logits = logits(model, input_ids)

    assert merge_lora(model) == names
    assert all(model.get_submodule(n).merged for n in names)
    assert not torch.equal(model.get_submodule(names[0]).base.weight, before[names[0]])
    torch.testing.assert_close(logits(model, input_ids), unmerged_logits, atol=1e-5, rtol=0)

    assert unmerge_lora(model) == names
    for n in names:
        torch.testing.assert_close(model.get_submodule(n).base.weight, before[n], atol=1e-6, rtol=0)
    torch.testing.assert_close(logits(model, input_ids), unmerged_logits, atol=1e-5, rtol=0)


def test_merged_weight_is_w_plus_delta():
    layer = LoRALinear(nn.Linear(6, 5), r=2, alpha=3)
    nn.init.normal_(layer.lora_B)
    w = layer.base.weight.detach().clone()
    layer.merge()
    torch.testing.assert_close(layer.base.weight, w + layer.delta_weight().detach())


def test_double_merge_and_unmerge_without_merge_raise():
    layer = LoRALinear(nn.Linear(4, 4), r=2)
    with pytest.raises(RuntimeError, match="call merge"):
        layer.unmerge()
    layer.merge()
    with pytest.raises(RuntimeError, match="already merged"):
        layer.merge()


@pytest.mark.parametrize("r", [1, 3, 8])
def test_delta_weight_rank_at_most_r(r):
    torch.manual_seed(r)
    layer = LoRALinear(nn.Linear(32, 48), r=r, alpha=16)
    nn.init.normal_(layer.lora_B)
    delta = layer.delta_weight()
    assert delta.shape == layer.base.weight.shape == (48, 32)
    assert torch.linalg.matrix_rank(delta.detach()).item() == r  # random A, B: rank exactly r


def test_forward_formula_with_bias_and_batch_dims():
    torch.manual_seed(0)
    base = nn.Linear(7, 5)
    layer = LoRALinear(base, r=3, alpha=6)
    nn.init.normal_(layer.lora_B)
    x = torch.randn(2, 4, 7)
    expected = x @ base.weight.T + base.bias + 2.0 * (x @ layer.lora_A.T @ layer.lora_B.T)
    torch.testing.assert_close(layer(x), expected)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_lora_params_follow_base_dtype(dtype):
    layer = LoRALinear(nn.Linear(8, 4).to(dtype), r=2)
    assert layer.lora_A.dtype == layer.lora_B.dtype == dtype
    assert layer.lora_A.device == layer.base.weight.device
    assert layer(torch.randn(3, 8, dtype=dtype)).dtype == dtype


def test_dropout_only_on_lora_path():
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(16, 16), r=4, dropout=0.5)
    assert isinstance(layer.dropout, nn.Dropout)
    assert isinstance(LoRALinear(nn.Linear(4, 4), r=2).dropout, nn.Identity)
    x = torch.randn(8, 16)
    # B = 0: the LoRA path is zero, so dropout must not touch the base output.
    torch.testing.assert_close(layer.train()(x), layer.base(x))
    nn.init.normal_(layer.lora_B)
    assert not torch.allclose(layer.train()(x), layer.train()(x))  # random masks differ
    torch.testing.assert_close(layer.eval()(x), layer.eval()(x))


# -----------------------------------------------------------------------------
# Gradients


def test_only_lora_parameters_get_gradients(base_model, input_ids):
    model = copy.deepcopy(base_model).train()
    names = inject_lora(model, TARGETS, r=R, alpha=ALPHA)
    randomize_lora(model)  # with B = 0 the gradient of A would be exactly zero
    model(input_ids=input_ids, labels=input_ids).loss.backward()

    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    expected = {f"{n}.lora_{x}" for n in names for x in "AB"}
    assert trainable == expected
    for name, param in model.named_parameters():
        if name in expected:
            assert param.grad is not None and param.grad.abs().sum() > 0, name
        else:
            assert param.grad is None, name


def test_layer_freezes_base():
    layer = LoRALinear(nn.Linear(4, 3), r=2)
    assert not layer.base.weight.requires_grad and not layer.base.bias.requires_grad
    assert layer.lora_A.requires_grad and layer.lora_B.requires_grad


# -----------------------------------------------------------------------------
# Bad inputs give errors that say what to do


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"r": 0}, ValueError, r"r must be a positive integer \(got 0\); try r=8"),
        ({"r": -2}, ValueError, "r must be a positive integer"),
        ({"r": 2.5}, TypeError, "r must be a positive integer"),
        ({"r": True}, TypeError, "r must be a positive integer"),
        ({"alpha": 0}, ValueError, "alpha must be a positive number"),
        ({"alpha": float("nan")}, ValueError, "alpha must be a positive number"),
        ({"alpha": "16"}, TypeError, "alpha must be a positive number"),
        ({"dropout": 1.0}, ValueError, r"dropout must be a number in \[0, 1\)"),
        ({"dropout": -0.1}, ValueError, "dropout must be a number"),
        ({"use_rslora": 1}, TypeError, "use_rslora must be True or False"),
    ],
)
def test_layer_rejects_bad_hyperparameters(kwargs, error, match):
    with pytest.raises(error, match=match):
        LoRALinear(nn.Linear(4, 4), **kwargs)


def test_layer_rejects_non_linear_base():
    with pytest.raises(TypeError, match="base must be a torch.nn.Linear"):
        LoRALinear(nn.Conv1d(4, 4, 1))
    with pytest.raises(TypeError, match="floating-point"):
        LoRALinear(_int_linear())


def _int_linear() -> nn.Linear:
    """An nn.Linear whose weight is an integer tensor, like a quantized layer."""
    layer = nn.Linear(4, 4)
    layer.weight = nn.Parameter(torch.zeros(4, 4, dtype=torch.int8), requires_grad=False)
    return layer


@pytest.mark.parametrize(
    ("targets", "error", "match"),
    [
        ("q_proj", TypeError, r"wrap it in a list: \['q_proj'\]"),
        ([], ValueError, "target_modules must be a non-empty list"),
        (None, ValueError, "target_modules must be a non-empty list"),
        (["q_proj", 3], TypeError, "must be a non-empty string"),
        ([""], TypeError, "must be a non-empty string"),
    ],
)
def test_inject_rejects_bad_target_modules(base_model, targets, error, match):
    with pytest.raises(error, match=match):
        inject_lora(copy.deepcopy(base_model), targets, r=4, alpha=8)


def test_inject_no_match_lists_available_names(base_model):
    model = copy.deepcopy(base_model)
    with pytest.raises(ValueError, match=r"no nn.Linear.*\['qproj'\].*'q_proj'.*pick"):
        inject_lora(model, ["qproj"], r=4, alpha=8)
    # A failed call leaves the model untouched and trainable.
    assert all(p.requires_grad for p in model.parameters())


def test_inject_bad_hyperparameters_fail_before_touching_model(base_model):
    model = copy.deepcopy(base_model)
    with pytest.raises(ValueError, match="try r=8"):
        inject_lora(model, TARGETS, r=0, alpha=8)
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    assert all(p.requires_grad for p in model.parameters())


def test_inject_twice_says_so(base_model):
    model = copy.deepcopy(base_model)
    inject_lora(model, TARGETS, r=4, alpha=8)
    with pytest.raises(ValueError, match="already have LoRA adapters"):
        inject_lora(model, TARGETS, r=4, alpha=8)


def test_inject_matches_whole_name_parts_only():
    model = nn.Sequential()
    model.add_module("q_proj", nn.Linear(4, 4))
    model.add_module("xq_proj", nn.Linear(4, 4))
    assert inject_lora(model, ["q_proj"], r=2, alpha=4) == ["q_proj"]
    assert isinstance(model.xq_proj, nn.Linear)


def test_model_level_helpers_reject_bad_models():
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        inject_lora("gpt2", TARGETS, r=4, alpha=8)
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        count_trainable_parameters(None)
    with pytest.raises(ValueError, match="call inject_lora"):
        merge_lora(nn.Linear(4, 4))
    with pytest.raises(ValueError, match="call inject_lora"):
        unmerge_lora(nn.Sequential(nn.Linear(4, 4)))


# -----------------------------------------------------------------------------
# Lesson 02 helpers: scaling, parameter table, PEFT interop, first-step update norm


@pytest.mark.parametrize(
    ("r", "alpha", "use_rslora"), [(8, 16, False), (16, 32, True), (1, 1, False)]
)
def test_lora_scaling_matches_the_layer(r, alpha, use_rslora):
    layer = LoRALinear(nn.Linear(32, 32), r=r, alpha=alpha, use_rslora=use_rslora)
    assert lora_scaling(r, alpha, use_rslora) == layer.scaling
    assert lora_scaling(r, alpha, use_rslora) == (alpha / math.sqrt(r) if use_rslora else alpha / r)


def test_lora_scaling_rejects_bad_values():
    with pytest.raises(ValueError, match="try r=8"):
        lora_scaling(0, 16)
    with pytest.raises(ValueError, match="alpha must be a positive number"):
        lora_scaling(8, -1)
    with pytest.raises(TypeError, match="use_rslora must be True or False"):
        lora_scaling(8, 16, "yes")


def test_lora_parameter_table_from_modules_and_shapes(base_model):
    attention = base_model.model.layers[0].self_attn
    rows = lora_parameter_table({"q_proj": attention.q_proj, "up": (128, 64)}, r=4)
    assert rows[0] == {
        "layer": "q_proj",
        "d_out": 64,
        "d_in": 64,
        "full": 64 * 64,
        "lora": 4 * (64 + 64),
        "ratio": 4 * 128 / 4096,
    }
    assert rows[1]["lora"] == lora_parameter_count(128, 64, 4) == 4 * 192
    assert rows[1]["full"] == 128 * 64
    with pytest.raises(ValueError, match="non-empty dict"):
        lora_parameter_table({}, r=4)
    with pytest.raises(TypeError, match=r"\(d_out, d_in\) tuple"):
        lora_parameter_table({"x": [4, 4]}, r=4)


@pytest.mark.parametrize("use_rslora", [False, True])
def test_copy_lora_weights_to_peft_gives_identical_logits(base_model, input_ids, use_rslora):
    config = LoraConfig(r=R, lora_alpha=ALPHA, target_modules=TARGETS, use_rslora=use_rslora)
    peft_model = get_peft_model(copy.deepcopy(base_model), config).eval()
    ours = copy.deepcopy(base_model)
    names = inject_lora(ours, TARGETS, r=R, alpha=ALPHA, use_rslora=use_rslora)
    randomize_lora(ours)
    assert copy_lora_weights_to_peft(ours, peft_model) == names
    got, expected = logits(ours, input_ids), logits(peft_model, input_ids)
    assert (got - logits(base_model, input_ids)).abs().max() > 1e-3
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)


def test_copy_lora_weights_to_peft_rejects_mismatches(base_model):
    ours = copy.deepcopy(base_model)
    inject_lora(ours, TARGETS, r=R, alpha=ALPHA)
    other_alpha = get_peft_model(
        copy.deepcopy(base_model), LoraConfig(r=R, lora_alpha=2 * ALPHA, target_modules=TARGETS)
    )
    with pytest.raises(ValueError, match="same lora_alpha"):
        copy_lora_weights_to_peft(ours, other_alpha)
    other_r = get_peft_model(
        copy.deepcopy(base_model), LoraConfig(r=2 * R, lora_alpha=ALPHA, target_modules=TARGETS)
    )
    with pytest.raises(ValueError, match="same r"):
        copy_lora_weights_to_peft(ours, other_r)
    only_q = get_peft_model(
        copy.deepcopy(base_model), LoraConfig(r=R, lora_alpha=ALPHA, target_modules=["q_proj"])
    )
    with pytest.raises(ValueError, match="same target_modules"):
        copy_lora_weights_to_peft(ours, only_q)
    with pytest.raises(ValueError, match="call inject_lora"):
        copy_lora_weights_to_peft(copy.deepcopy(base_model), only_q)


def test_first_step_update_norm_follows_the_scaling_rule():
    plain = {r: first_step_update_norm(r, 16) for r in (1, 4, 16, 64)}
    rs = {r: first_step_update_norm(r, 16, use_rslora=True) for r in (1, 4, 16, 64)}
    assert plain[1] == rs[1]  # sqrt(1) == 1: the two rules agree at r = 1
    # With Adam, ||ΔW|| ~ scale * sqrt(r): alpha / r shrinks like 1 / sqrt(r), rsLoRA stays put.
    for small, big in ((1, 4), (4, 16), (16, 64)):
        assert plain[small] / plain[big] == pytest.approx(2.0, rel=0.2)
        assert rs[big] / rs[small] == pytest.approx(1.0, rel=0.1)
    # Doubling alpha doubles the update (B's first Adam step does not depend on the scale).
    assert first_step_update_norm(8, 32) / first_step_update_norm(8, 16) == pytest.approx(2.0)


def test_first_step_update_norm_is_deterministic_and_keeps_global_rng():
    state = torch.get_rng_state()
    assert first_step_update_norm(8, 16) == first_step_update_norm(8, 16)
    assert torch.equal(torch.get_rng_state(), state)
    assert first_step_update_norm(8, 16, seed=1) != first_step_update_norm(8, 16, seed=0)


def test_first_step_update_norm_rejects_bad_values():
    with pytest.raises(ValueError, match="try r=8"):
        first_step_update_norm(0, 16)
    with pytest.raises(ValueError, match="larger than the layer allows"):
        first_step_update_norm(20, 16, d_in=16, d_out=32)
    with pytest.raises(ValueError, match="alpha must be a positive number"):
        first_step_update_norm(8, 0)
