"""Tests for course_utils.sharding: bytes per device under DDP, ZeRO-1/2/3 and FSDP, by hand."""

import pytest

from course_utils import memory as M
from course_utils import sharding as S

# Mixed-precision AdamW as in the ZeRO paper: bf16 weights (2 bytes) and gradients (2 bytes),
# fp32 master weights + two fp32 moments (4 + 8 = 12 bytes, counted as optimizer states).
MIXED = {"dtype": "bf16", "master_weights": True}
STAGES = ("ddp", "zero1", "zero2", "zero3")
PSI = 7_000_000_000  # a "7B" model given as a bare parameter count: no activations, no shapes


def _mixed(n_params=PSI):
    return M.estimate(n_params, "full", **MIXED)


# ------------------------------------------------------------------------------ the ZeRO rules


def test_a_7b_model_on_8_devices_in_each_stage():
    est = _mixed()
    # one device holds 2Ψ + 2Ψ + 12Ψ = 16 x 7e9 = 112e9 bytes
    assert (est.weights, est.gradients, est.optimizer) == (14e9, 14e9, 84e9)
    cases = {
        # stage: (weights, gradients, optimizer) per device, N = 8
        "ddp": (14e9, 14e9, 84e9),  # nothing sharded: 112e9
        "zero1": (14e9, 14e9, 10.5e9),  # 4Ψ + 12Ψ/8 = 28e9 + 10.5e9 = 38.5e9
        "zero2": (14e9, 1.75e9, 10.5e9),  # 2Ψ + 14Ψ/8 = 14e9 + 12.25e9 = 26.25e9
        "zero3": (1.75e9, 1.75e9, 10.5e9),  # 16Ψ/8 = 14e9
        "fsdp_shard_grad_op": (14e9, 1.75e9, 10.5e9),  # = ZeRO-2
        "fsdp_full_shard": (1.75e9, 1.75e9, 10.5e9),  # = ZeRO-3
    }
    totals = {"ddp": 112e9, "zero1": 38.5e9, "zero2": 26.25e9, "zero3": 14e9}
    for stage, parts in cases.items():
        dev = S.per_device(est, 8, stage)
        assert (dev.weights, dev.gradients, dev.optimizer) == parts, stage
        assert dev.model_states == sum(parts)
        assert dev.total == sum(parts)  # no activations for a bare count
        assert dev.host == 0 and dev.activations == 0
        if stage in totals:
            assert dev.model_states == totals[stage]


def test_the_zero_papers_figure_1():
    """Ψ = 7.5B on N = 64 devices, K = 12: 120, 31.4, 16.6 and 1.9 GB (10**9 bytes) per device."""
    est = _mixed(7_500_000_000)
    shown = {stage: S.per_device(est, 64, stage).model_states / 1e9 for stage in STAGES}
    assert shown["ddp"] == 120
    assert round(shown["zero1"], 1) == 31.4  # 30 + 90/64 = 31.40625
    assert round(shown["zero2"], 1) == 16.6  # 15 + 105/64 = 16.640625
    assert round(shown["zero3"], 1) == 1.9  # 120/64 = 1.875


def test_hybrid_shard_shards_within_a_node_and_replicates_across():
    est = _mixed()
    # 8 devices as 2 nodes of 4: each device holds 1/4 of everything, 112e9 / 4 = 28e9
    dev = S.per_device(est, 8, "fsdp_hybrid_shard", devices_per_node=4)
    assert (dev.weights, dev.gradients, dev.optimizer) == (3.5e9, 3.5e9, 21e9)
    assert dev.shard_group == 4 and dev.model_states == 28e9
    assert any("replicated 2 times" in note for note in dev.notes)
    # one node of 8 is FULL_SHARD
    whole = S.per_device(est, 8, "fsdp_hybrid_shard", devices_per_node=8)
    assert whole.model_states == S.per_device(est, 8, "zero3").model_states == 14e9


def test_without_a_master_copy_the_optimizer_keeps_its_own_weight_shard():
    # fp32 AdamW (no master copy): 4 + 4 + 8 bytes; ZeRO-2 on 8 devices keeps the weights whole
    # (28e9) and the shard the optimizer updates (28e9 / 8 = 3.5e9) beside them
    est = M.estimate(PSI, "full", dtype="fp32")
    assert not est.master_weights and _mixed().master_weights
    dev = S.per_device(est, 8, "zero2")
    assert (dev.weights, dev.gradients, dev.optimizer) == (31.5e9, 3.5e9, 7e9)
    assert S.per_device(est, 8, "zero3").weights == 3.5e9  # the shard is the only copy
    assert S.per_device(est, 8, "ddp").weights == 28e9  # nothing sharded, nothing beside


def test_cpu_offload_moves_bytes_to_the_host():
    est = _mixed()
    # ZeRO-2 + offload_optimizer (ZeRO-Offload): the device keeps the bf16 weights, 2Ψ = 14e9
    # (DeepSpeed's own estimator says 2Ψ too); the host gets the gradient shard 14e9/8 = 1.75e9
    # and the optimizer shard 84e9/8 = 10.5e9 = 12.25e9 per process.
    dev = S.per_device(est, 8, "zero2", offload="optimizer")
    assert (dev.weights, dev.gradients, dev.optimizer, dev.host) == (14e9, 0, 0, 12.25e9)
    # ZeRO-1 shards no gradients, so they stay on the device whole: 14e9 + 14e9
    dev = S.per_device(est, 8, "zero1", offload="optimizer")
    assert (dev.weights, dev.gradients, dev.optimizer, dev.host) == (14e9, 14e9, 0, 10.5e9)
    # ZeRO-3 + optimizer offload: the device keeps its weight shard, 14e9/8 = 1.75e9
    dev = S.per_device(est, 8, "zero3", offload="optimizer")
    assert (dev.weights, dev.gradients, dev.optimizer, dev.host) == (1.75e9, 0, 0, 12.25e9)
    # ... and with the parameters offloaded too, the whole 16Ψ/8 = 14e9 lives on the host
    dev = S.per_device(est, 8, "fsdp_full_shard", offload="params")
    assert (dev.model_states, dev.host) == (0, 14e9)


# ------------------------------------------------------------------------------ LoRA, activations


def test_lora_gains_little_from_zero_1_and_2_and_much_from_zero_3():
    # Llama-2-7B: 6,738,415,616 parameters. LoRA r=16 on all 7 linear layers of 32 layers:
    # per layer 4 x 16 x (4096 + 4096) + 2 x 16 x (4096 + 11008) + 16 x (11008 + 4096)
    # = 524,288 + 483,328 + 241,664 = 1,249,280; x 32 = 39,976,960 trainable (fp32 adapters).
    est = M.estimate("Llama-2-7B", "lora", dtype="bf16", batch=1, seq_len=512)
    assert est.n_params == 6_738_415_616 and est.trainable_params == 39_976_960
    weights = 6_738_415_616 * 2 + 39_976_960 * 4  # 13,636,739,072
    assert (est.weights, est.gradients, est.optimizer) == (weights, 159_907_840, 319_815_680)
    zero2 = S.per_device(est, 8, "zero2")
    # gradients 159,907,840 / 8 = 19,988,480; Adam 319,815,680 / 8 = 39,976,960; the weights
    # stay whole, plus the optimizer's own fp32 shard of the adapters, 159,907,840 / 8 again
    parts = (weights + 19_988_480, 19_988_480, 39_976_960)
    assert (zero2.weights, zero2.gradients, zero2.optimizer) == parts
    zero3 = S.per_device(est, 8, "zero3")
    assert zero3.weights == weights // 8 == 1_704_592_384  # the frozen base is divided too
    # activations belong to each device's own micro-batch: the same in every stage
    for stage in S.STAGES:
        kwargs = {"devices_per_node": 4} if stage == "fsdp_hybrid_shard" else {}
        assert S.per_device(est, 8, stage, **kwargs).activations == est.activations > 0


def test_estimate_per_device_adds_the_gathered_unit_for_sharded_weights():
    # SmolLM2-135M full fine-tuning in fp32 (the CPU lab): 134,515,008 parameters, 16 bytes each.
    n = M.count_params("SmolLM2-135M")
    assert n == 134_515_008
    # the largest unit is the root: tied embeddings 49152 x 576 = 28,311,552 + final norm 576
    assert S.largest_unit_params("SmolLM2-135M") == 28_312_128
    kw = {"batch": 2, "seq_len": 64, "loss": "standard"}
    one = S.estimate_per_device("SmolLM2-135M", "full", 1, "ddp", **kw)
    two = S.estimate_per_device("SmolLM2-135M", "full", 2, "fsdp_full_shard", **kw)
    assert one.model_states == 16 * n and one.gathered == 0
    assert (two.weights, two.gradients, two.optimizer) == (2 * n, 2 * n, 4 * n)  # 16n / 2
    # the root's fp32 weights, their gradient and the reduce-scatter's copy of it
    assert two.gathered == 3 * 28_312_128 * 4
    # SHARD_GRAD_OP keeps the weights whole (4n) beside the shard AdamW updates (4n / 2)
    grad_op = S.estimate_per_device("SmolLM2-135M", "full", 2, "fsdp_shard_grad_op", **kw)
    assert (grad_op.weights, grad_op.gradients, grad_op.optimizer) == (6 * n, 2 * n, 4 * n)
    assert grad_op.gathered == 0
    assert two.activations == one.activations == M.estimate("SmolLM2-135M", **kw).activations
    assert two.total < one.total
    # a bare count has no shapes: no gathered unit, and a note says so
    bare = S.estimate_per_device(n, "full", 2, "zero3")
    assert bare.gathered == 0 and any("gathered" in note for note in bare.notes)
    assert "per device" in str(two) and set(two.to_gb()) == set(two.breakdown())


def test_fits_on_devices_and_devices_needed():
    # 7B mixed precision: 112e9 bytes of model states never fit one 80 GB card under DDP ...
    kw = {**MIXED}
    assert not S.fits_on_devices(PSI, "full", "A100 80 GB", 8, "ddp", **kw)
    assert S.devices_needed(PSI, "full", "A100 80 GB", "ddp", **kw) is None
    # ... but ZeRO-3 on 8 needs 14e9 bytes each (13.04 GiB), under 0.9 x 40 GiB
    assert S.fits_on_devices(PSI, "full", "A100 40 GB", 8, "zero3", **kw)
    # fewest 80 GB cards for ZeRO-3: 112e9 / n <= 0.9 x 80 GiB = 77.31e9 -> n = 2
    assert S.devices_needed(PSI, "full", "A100 80 GB", "zero3", **kw) == 2
    # ZeRO-2 keeps 14e9 of bf16 weights whole: 14e9 + 98e9 / n <= 0.9 x 16 GiB = 15.46e9 -> n = 68
    assert S.devices_needed(PSI, "full", "T4 16 GB", "zero2", **kw) == 68
    assert S.devices_needed(PSI, "full", "T4 16 GB", "zero1", max_devices=64, **kw) is None


def test_stage_spellings():
    assert S.normalise_stage("ZeRO-2") == "zero2"
    assert S.normalise_stage("FULL_SHARD") == "fsdp_full_shard"
    assert S.normalise_stage("SHARD_GRAD_OP") == "fsdp_shard_grad_op"
    assert S.normalise_stage("HYBRID_SHARD") == "fsdp_hybrid_shard"
    assert S.normalise_stage("NO_SHARD") == "ddp"


def test_per_process_batch():
    assert S.per_process_batch(8, 2) == 4
    assert S.per_process_batch(4, 2, available=2) == 2


# ------------------------------------------------------------------------------ bad input


def _one_sentence(excinfo) -> str:
    message = str(excinfo.value)
    assert message.count(". ") == 0 and message.endswith((".", ")")), message
    return message


@pytest.mark.parametrize(
    "kwargs, words",
    [
        ({"n_devices": 0}, "n_devices must be a positive integer"),  # world size 0
        ({"n_devices": 2.0}, "n_devices must be a positive integer"),
        ({"stage": "zero4"}, "unknown stage"),
        ({"stage": 3}, "stage must be a name"),
        ({"stage": "fsdp_hybrid_shard"}, "needs devices_per_node"),
        ({"stage": "fsdp_hybrid_shard", "devices_per_node": 16}, "more than the n_devices=8"),
        ({"stage": "fsdp_hybrid_shard", "devices_per_node": 3}, "does not divide n_devices=8"),
        ({"stage": "zero3", "devices_per_node": 4}, "only applies to 'fsdp_hybrid_shard'"),
        ({"stage": "ddp", "offload": "optimizer"}, "needs a sharded stage"),
        ({"stage": "zero2", "offload": "params"}, "shards the weights"),
        ({"stage": "fsdp_full_shard", "offload": "optimizer"}, "not the optimizer alone"),
        ({"stage": "zero3", "offload": "disk"}, "offload must be one of"),
        ({"stage": "zero3", "unit_bytes": -1}, "unit_bytes must be"),
    ],
)
def test_bad_input_gets_one_sentence(kwargs, words):
    args = {"n_devices": 8, "stage": "zero3", **kwargs}
    with pytest.raises((ValueError, TypeError)) as excinfo:
        S.per_device(_mixed(), **args)
    assert words in _one_sentence(excinfo)


def test_bad_input_elsewhere():
    with pytest.raises(TypeError) as excinfo:
        S.per_device(112e9, 8, "zero3")
    assert "MemoryEstimate" in _one_sentence(excinfo)
    with pytest.raises(ValueError) as excinfo:
        S.per_process_batch(4, 3)
    assert "not divisible by n_processes=3" in _one_sentence(excinfo)
    with pytest.raises(ValueError) as excinfo:
        S.per_process_batch(8, 4, available=2)
    assert "more than the 2 devices or cores" in _one_sentence(excinfo)
    with pytest.raises(ValueError) as excinfo:
        S.per_process_batch(8, 0)
    assert "n_processes must be a positive integer" in _one_sentence(excinfo)
    with pytest.raises(ValueError) as excinfo:
        S.devices_needed(PSI, "full", "A100 80 GB", "hybrid_shard")
    assert "does not size" in _one_sentence(excinfo)
    with pytest.raises(ValueError) as excinfo:
        S.fits_on_devices(PSI, "full", "H800 80 GB", 8, "zero3")
    assert "unknown GPU" in _one_sentence(excinfo)


def test_ddp_holds_its_gradient_buckets_beside_the_activations():
    # SmolLM2 full fine-tuning, 2 processes x batch 2: DDP's buckets keep the 4n bytes of
    # gradients from one step to the next, so they add to the activations at the peak
    kw = {"batch": 2, "seq_len": 64, "loss": "standard"}
    one = S.estimate_per_device("SmolLM2-135M", "full", 1, "ddp", **kw)
    two = S.estimate_per_device("SmolLM2-135M", "full", 2, "ddp", **kw)
    assert not one.persistent_gradients and two.persistent_gradients
    w, g, o, a = two.weights, two.gradients, two.optimizer, two.activations
    assert two.total == w + o + g + max(a, two.temporaries)
    assert one.total == w + o + max(a, g + one.temporaries)
    assert two.total - one.total == min(g, a - one.temporaries) > 0
    assert any("buckets" in note for note in two.notes)
    assert not S.estimate_per_device("SmolLM2-135M", "full", 2, "zero1", **kw).persistent_gradients
