"""Tests for course_utils.delta_lora: the update rule of Zi et al. (2023), checked by hand."""

import pytest
import torch
from torch import nn

from course_utils import delta_lora, lora


class Tiny(nn.Module):
    """One 3 -> 2 linear layer called q_proj, plus a head that must stay untouched."""

    def __init__(self):
        super().__init__()
        self.q_proj = nn.Linear(3, 2, bias=False)
        self.lm_head = nn.Linear(2, 2, bias=False)

    def forward(self, x):
        return self.lm_head(self.q_proj(x))


def tiny(r=1, alpha=2.0, update_ratio=0.5, start_steps=0):
    torch.manual_seed(0)
    model = Tiny()
    config = delta_lora.DeltaLoRAConfig(
        r=r, alpha=alpha, update_ratio=update_ratio, start_steps=start_steps
    )
    delta_lora.inject_delta_lora(model, config)
    return model


def test_inject_wraps_every_linear_but_the_head_without_dropout():
    model = tiny()
    assert isinstance(model.q_proj, lora.LoRALinear) and isinstance(model.lm_head, nn.Linear)
    assert isinstance(model.q_proj.dropout, nn.Identity)  # the paper removes LoRA's dropout
    assert [n for n, p in model.named_parameters() if p.requires_grad] == [
        "q_proj.lora_A",
        "q_proj.lora_B",
    ]


def test_the_update_is_lambda_s_times_the_change_of_b_a_worked_by_hand():
    model = tiny(r=1, alpha=2.0, update_ratio=0.5)  # s = alpha / r = 2, λ = 0.5: λ·s = 1
    layer = model.q_proj
    with torch.no_grad():
        layer.base.weight.copy_(torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]))
        layer.lora_A.copy_(torch.tensor([[1.0, 2.0, 3.0]]))
        layer.lora_B.copy_(torch.tensor([[0.0], [1.0]]))
    head = model.lm_head.weight.detach().clone()
    updater = delta_lora.DeltaLoRAUpdater(model)
    updater.before_step()
    with torch.no_grad():  # what an optimizer step might do
        layer.lora_A.copy_(torch.tensor([[1.0, 0.0, 1.0]]))
        layer.lora_B.copy_(torch.tensor([[2.0], [1.0]]))
    assert updater.after_step(1)
    # B'A' = [[2, 0, 2], [1, 0, 1]], BA = [[0, 0, 0], [1, 2, 3]]; the change is
    # [[2, 0, 2], [0, -2, -2]], times λ·s = 1, added to W.
    expected = torch.tensor([[3.0, 0.0, 2.0], [0.0, -1.0, -2.0]])
    assert torch.equal(layer.base.weight, expected)
    assert torch.equal(model.lm_head.weight, head)  # only the adapted layer's W moves


def test_w_stays_frozen_until_after_the_start_steps():
    model = tiny(start_steps=2)
    layer = model.q_proj
    w0 = layer.base.weight.detach().clone()
    updater = delta_lora.DeltaLoRAUpdater(model)
    moved = []
    for t in range(4):  # the paper's loop: t = 0, 1, ...; W moves when t > K
        updater.before_step()
        with torch.no_grad():
            layer.lora_B.add_(0.1)
        moved.append(updater.after_step(t))
    assert moved == [False, False, False, True]
    assert not torch.equal(layer.base.weight, w0) and updater.updates == 1


def test_a_training_loop_with_sgd_matches_the_update_rule_written_out():
    model = tiny(r=1, alpha=2.0, update_ratio=2.0)
    layer = model.q_proj
    with torch.no_grad():
        layer.lora_B.fill_(0.5)  # so that both A and B get a gradient
    optimizer = torch.optim.SGD([layer.lora_A, layer.lora_B], lr=0.1)
    updater = delta_lora.DeltaLoRAUpdater(model)
    x = torch.randn(5, 3)
    w, a, b = (t.detach().clone() for t in (layer.base.weight, layer.lora_A, layer.lora_B))
    for t in range(3):
        loss = model(x).square().sum()
        loss.backward()
        # The same step by hand: A, B by SGD, then W by λ·s·(B'A' − BA) from step 1 on.
        grad_a, grad_b = layer.lora_A.grad.clone(), layer.lora_B.grad.clone()
        new_a, new_b = a - 0.1 * grad_a, b - 0.1 * grad_b
        if t > 0:
            w = w + 2.0 * 2.0 * (new_b @ new_a - b @ a)
        a, b = new_a, new_b
        updater.before_step()
        optimizer.step()
        updater.after_step(t)
        optimizer.zero_grad()
        assert torch.allclose(layer.base.weight, w, atol=1e-6), t
    assert torch.allclose(layer.lora_A, a) and torch.allclose(layer.lora_B, b)


def test_bad_configs_and_misuse_are_rejected():
    with pytest.raises(ValueError, match="update_ratio must be >= 0"):
        delta_lora.DeltaLoRAConfig(update_ratio=-1)
    with pytest.raises(ValueError, match="update_ratio must be a finite number"):
        delta_lora.DeltaLoRAConfig(update_ratio=float("nan"))
    with pytest.raises(ValueError, match="start_steps must be an integer >= 0"):
        delta_lora.DeltaLoRAConfig(start_steps=1.5)
    with pytest.raises(ValueError, match="r must be a positive integer"):
        delta_lora.DeltaLoRAConfig(r=0)
    with pytest.raises(ValueError, match="no Delta-LoRA layers"):
        delta_lora.DeltaLoRAUpdater(Tiny())
    with pytest.raises(TypeError, match="DeltaLoRAConfig"):
        delta_lora.inject_delta_lora(Tiny(), {"r": 4})
    updater = delta_lora.DeltaLoRAUpdater(tiny())
    with pytest.raises(RuntimeError, match="before_step"):
        updater.after_step(0)
    updater.before_step()
    with pytest.raises(ValueError, match="step must be an integer >= 0"):
        updater.after_step(-1)


def test_a_model_with_lora_dropout_is_refused():
    model = Tiny()
    lora.inject_lora(model, ["q_proj"], r=1, alpha=2, dropout=0.1)
    model.delta_lora_config = delta_lora.DeltaLoRAConfig(r=1, alpha=2)
    with pytest.raises(ValueError, match="without dropout"):
        delta_lora.DeltaLoRAUpdater(model)
