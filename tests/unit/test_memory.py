"""Tests for course_utils.memory: the estimator's rules and parameter counts against real models."""

import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from course_tools.bench import loss as bench_loss
from course_utils import assets, fused_loss
from course_utils import memory as M
from course_utils.quant import double_quant_bits_per_param

TINY = {
    **assets.TINY_LLAMA,
    "vocab_size": 128,
    "intermediate_size": 96,
    "tie_word_embeddings": False,
}


def _tiny_model(**overrides):
    return assets.tiny_llama(**{**TINY, **overrides})


# ------------------------------------------------------------------------------ the 16-byte rule


def test_full_fp32_adamw_is_16_bytes_per_param():
    est = M.estimate(1_000_000, method="full", dtype="fp32", optimizer="adamw")
    assert (est.weights, est.gradients, est.optimizer) == (4_000_000, 4_000_000, 8_000_000)
    assert est.weights + est.gradients + est.optimizer == 16 * 1_000_000
    assert est.activations == 0 and est.notes  # no config: activations unknown, and said so
    n = M.count_params("SmolLM2-135M")
    est = M.estimate("SmolLM2-135M")
    assert est.weights + est.gradients + est.optimizer == 16 * n


def test_other_dtypes_and_optimizers():
    n = 1_000_000
    bf16 = M.estimate(n, dtype="bf16")
    assert bf16.weights + bf16.gradients + bf16.optimizer == 12 * n
    mixed = M.estimate(n, dtype="bf16", master_weights=True)  # ZeRO paper's 2 + 2 + 12
    assert mixed.weights + mixed.gradients + mixed.optimizer == 16 * n
    assert M.estimate(n, optimizer="sgd").optimizer == 0
    assert M.estimate(n, optimizer="adamw_8bit").optimizer == pytest.approx(2.03125 * n)


def test_breakdown_and_to_gb():
    est = M.estimate("SmolLM2-135M", method="lora", dtype="bf16", batch=2, seq_len=256)
    parts = est.breakdown()
    # Backward frees activations while it writes gradients: the peak holds the larger of the two
    # (measured against real training steps by `python -m course_tools.bench memory`).
    peak = max(est.activations, est.gradients + est.temporaries)
    assert parts["total"] == est.total == est.weights + est.optimizer + peak
    assert est.to_gb()["total"] == pytest.approx(est.total / 2**30)
    assert "GB" in str(est)


# ------------------------------------------------------------------------------ parameter counts


def test_preset_param_counts():
    assert M.count_params("SmolLM2-135M") == 134_515_008
    assert M.count_params(M.PRESETS["Llama-2-7B"]) == 6_738_415_616
    assert M.count_params("llama-3.2-1b") == 1_235_814_400  # names are case-insensitive


@pytest.mark.parametrize("name", ["SmolLM2-135M", "Llama-3.2-1B"])
def test_preset_count_equals_a_real_model_on_the_meta_device(name):
    config = LlamaConfig(**M.PRESETS[name])
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    real = sum(p.numel() for p in model.parameters())  # tied weights are listed once
    assert real == M.count_params(M.PRESETS[name]) == M.count_params(config)
    if name == "SmolLM2-135M":
        assert real == 134_515_008


def test_count_with_biases_matches_a_real_model():
    model = _tiny_model(attention_bias=True, mlp_bias=True)
    assert M.count_params(model.config) == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("targets", ["all-linear", ["q_proj", "v_proj"], ["down_proj"]])
def test_lora_trainable_count_equals_peft(targets):
    peft = pytest.importorskip("peft")
    model = _tiny_model()
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, task_type="CAUSAL_LM")
    peft_model = peft.get_peft_model(model, config)
    trainable, _ = peft_model.get_nb_trainable_parameters()
    assert M.lora_trainable_params(TINY, r=4, targets=targets) == trainable
    assert M.estimate(TINY, method="lora", lora_r=4, lora_targets=targets).trainable_params == (
        trainable
    )


def test_lora_and_qlora_memory():
    n = M.count_params("Llama-2-7B")
    lora = M.estimate("Llama-2-7B", method="lora", dtype="bf16", lora_r=16)
    assert lora.trainable_params == 39_976_960  # r=16 on all 7 linear layers of 32 blocks
    assert lora.weights == 2 * n + 4 * lora.trainable_params  # adapters in fp32 (PEFT default)
    assert lora.gradients == 4 * lora.trainable_params
    assert lora.optimizer == 8 * lora.trainable_params
    qlora = M.estimate("Llama-2-7B", method="qlora", dtype="bf16", lora_r=16)
    embeddings = 2 * 32000 * 4096  # embed_tokens and lm_head stay in bf16
    linear = 32 * (4 * 4096 * 4096 + 3 * 4096 * 11008)
    rest = n - embeddings - linear  # RMSNorm weights
    expected = linear * double_quant_bits_per_param() / 8 + 2 * (embeddings + rest)
    assert qlora.weights == pytest.approx(expected + 4 * qlora.trainable_params, abs=1)
    assert qlora.weights < lora.weights / 3
    assert M.fits(qlora, "24 GB") and not M.fits(M.estimate("Llama-2-7B"), "A100 80 GB")


def test_activations_scale_with_batch_and_checkpointing():
    std = {"loss": "standard"}  # every token's logits: activations linear in the batch
    one = M.estimate("SmolLM2-135M", batch=1, seq_len=128, **std).activations
    four = M.estimate("SmolLM2-135M", batch=4, seq_len=128, **std).activations
    assert four == 4 * one > 0
    ckpt = M.estimate("SmolLM2-135M", batch=4, seq_len=128, gradient_checkpointing=True, **std)
    assert ckpt.activations < four / 2  # measured on SmolLM2: ~2.7x less at QLoRA's peak
    eager = M.estimate("SmolLM2-135M", batch=4, seq_len=128, attention="eager", **std)
    assert eager.activations > four


def test_the_default_loss_is_what_trls_sft_trainer_uses():
    from trl import SFTConfig

    assert M.DEFAULT_LOSS == SFTConfig(output_dir="unused", bf16=False).loss_type == "chunked_nll"
    kw = {"method": "full", "batch": 8, "seq_len": 160}
    assert M.estimate("SmolLM2-135M", **kw) == M.estimate("SmolLM2-135M", loss="chunked_nll", **kw)


# The logits of one loss, measured: hidden states of 1024 tokens against a vocabulary of 8192.
LOSS_TOKENS, LOSS_VOCAB = 1024, 8192


def _loss_peak_bytes(loss_fn) -> int:
    """Peak bytes of live tensors while `loss_fn(hidden, weight, labels)` runs and backpropagates."""
    from course_utils.peak_memory import PeakMemory

    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(1, LOSS_TOKENS, 16, generator=gen, requires_grad=True)
    weight = torch.randn(LOSS_VOCAB, 16, generator=gen, requires_grad=True)
    labels = torch.randint(0, LOSS_VOCAB, (1, LOSS_TOKENS), generator=gen)
    with PeakMemory() as peak:
        loss_fn(hidden, weight, labels).backward()
    return peak.peak


@pytest.mark.parametrize(
    "loss, loss_fn",
    list(bench_loss.LOSS_FUNCTIONS.items()),  # transformers', TRL's, the labs'
)
def test_each_loss_holds_the_logits_the_estimator_counts(loss, loss_fn):
    measured = _loss_peak_bytes(loss_fn)
    predicted = M._logit_bytes(LOSS_VOCAB, LOSS_TOKENS, loss)
    assert measured == pytest.approx(predicted, rel=0.1), (loss, measured, predicted)


def test_a_chunked_loss_lowers_the_estimate_by_its_logits():
    kw = {"method": "lora", "batch": 8, "seq_len": 128}
    standard = M.estimate("SmolLM2-135M", loss="standard", **kw)
    chunked = M.estimate("SmolLM2-135M", loss="chunked_nll", **kw)
    assert standard.activations - chunked.activations == 49152 * (1024 * 12 - 256 * 16)
    assert M.loss_chunk_tokens("chunked_nll", 49152) == 256
    assert M.loss_chunk_tokens("unsloth_cpu", 49152) == 16 * 2**20 // 49152 == 341
    assert M.loss_chunk_tokens("standard", 49152) is None
    assert M.loss_chunk_tokens("fused", 49152) == fused_loss.CHUNK_TOKENS
    # the fused loss keeps the head's fp32 gradient from forward to backward when it trains
    for method, head in (("full", 49152 * 576 * 4), ("lora", 0)):
        kw = {"method": method, "batch": 8, "seq_len": 128}
        fused = M.estimate("SmolLM2-135M", loss="fused", **kw).activations
        standard = M.estimate("SmolLM2-135M", loss="standard", **kw).activations
        assert fused - standard == head - 49152 * (
            1024 * 12 - 256 * 4.5  # one chunk's logits, 32 rows of probabilities beside them
        )
    few = {"method": "lora", "batch": 1, "seq_len": 100}  # fewer tokens than one chunk: all
    difference = M.estimate("SmolLM2-135M", loss="chunked_nll", **few).activations - (
        M.estimate("SmolLM2-135M", loss="standard", **few).activations
    )
    assert difference == 100 * 49152 * (16 - 12)
    # with checkpointing the logits and the recomputed layer come one after the other
    ckpt = M.estimate(
        "SmolLM2-135M", gradient_checkpointing=True, batch=4, seq_len=128, loss="standard"
    )
    kept = 4 * 128 * 30 * 576 * 4
    assert ckpt.activations == kept + M._logit_bytes(49152, 512, "standard")


def test_fits():
    assert set(M.GPUS) == {
        "T4 16 GB",
        "A100 40 GB",
        "A100 80 GB",
        "consumer 8 GB",
        "12 GB",
        "24 GB",
    }
    assert not M.fits(15 * M.GB, "T4 16 GB")  # 10 % is kept back by default
    assert M.fits(15 * M.GB, "T4 16 GB", usable_fraction=1.0)
    assert M.fits(M.estimate(10_000_000), 8)
    assert not M.fits(M.estimate(1_235_814_400), "T4 16 GB")  # 1B full fp32: ~18.4 GB


# ------------------------------------------------------------------------------ real models


def test_measure_model_bytes_equals_numel_times_element_size():
    model = _tiny_model().to(torch.bfloat16)
    expected = sum(t.numel() * t.element_size() for t in model.parameters())
    expected += sum(t.numel() * t.element_size() for t in model.buffers())
    assert M.measure_model_bytes(model) == expected
    with torch.device("meta"):
        meta = LlamaForCausalLM(LlamaConfig(**M.PRESETS["SmolLM2-135M"]))
    assert M.measure_model_bytes(meta) >= 4 * 134_515_008


def test_measure_model_bytes_counts_params4bit_storage():
    bnb = pytest.importorskip("bitsandbytes")
    layer = bnb.nn.Linear4bit(64, 128, bias=True, quant_type="nf4", compress_statistics=False)
    layer = layer.to("cpu")  # quantizes the weight
    weight = layer.weight
    assert weight.dtype == torch.uint8 and weight.numel() == 64 * 128 // 2
    absmax = weight.quant_state.absmax
    side = absmax.numel() * 4 + 16 * 4  # fp32 absmax per block of 64 + the 16-value code
    assert M.measure_model_bytes(layer, include_quant_state=False) == 64 * 128 // 2 + 128 * 4
    assert M.measure_model_bytes(layer) == 64 * 128 // 2 + 128 * 4 + side


# ------------------------------------------------------------------------------ bad inputs


def test_the_course_swiglu_lowers_the_estimate_by_two_mlp_tensors_per_layer():
    """memory.MLPS is counted against the MLP itself in tests/unit/test_swiglu.py."""
    kw = {"method": "lora", "batch": 8, "seq_len": 128}
    standard = M.estimate("SmolLM2-135M", **kw).activations
    fused = M.estimate("SmolLM2-135M", mlp="swiglu", **kw).activations
    # SiLU(gate) and SiLU(gate) * up: 180 MB each over 30 layers
    assert standard - fused == 2 * 8 * 128 * 30 * 1536 * 4


def test_bad_inputs_raise_helpful_errors():
    with pytest.raises(ValueError, match="unknown preset"):
        M.estimate("GPT-5")
    with pytest.raises(ValueError, match="method must be one of"):
        M.estimate(1000, method="dora")
    with pytest.raises(ValueError, match="optimizer must be one of"):
        M.estimate(1000, optimizer="adam")
    with pytest.raises(ValueError, match="pass a config or preset name"):
        M.estimate(1000, method="lora")
    assert M.estimate(1000, method="lora", trainable_params=10).trainable_params == 10
    with pytest.raises(ValueError, match="batch must be a positive integer"):
        M.estimate(1000, batch=0)
    with pytest.raises(ValueError, match="loss must be one of"):
        M.estimate("SmolLM2-135M", loss="dft")
    with pytest.raises(ValueError, match="mlp must be one of"):
        M.estimate("SmolLM2-135M", mlp="geglu")
    with pytest.raises(ValueError, match="Llama-style"):
        M.count_params({"n_embd": 768})
    with pytest.raises(ValueError, match="unknown target"):
        M.lora_trainable_params("SmolLM2-135M", targets=["lm_head"])
    with pytest.raises(ValueError, match="unknown GPU"):
        M.fits(1, "H100")
    with pytest.raises(TypeError, match="nn.Module"):
        M.measure_model_bytes(_tiny_model().state_dict())


# ------------------------------------------------------------------------------ weights alone


def test_param_groups_add_up_to_count_params():
    for name in M.PRESETS:
        groups = M.param_groups(name)
        assert set(groups) == {"embeddings", "linear", "other", "lm_head"}
        assert sum(groups.values()) == M.count_params(name)
    groups = M.param_groups("SmolLM2-135M")
    assert groups["lm_head"] == 0  # tied embeddings
    assert groups["embeddings"] == 49152 * 576


def test_weight_bytes_per_dtype_and_nf4():
    n = M.count_params("Llama-2-7B")
    assert M.weight_bytes("Llama-2-7B", "fp32") == 4 * n
    assert M.weight_bytes("Llama-2-7B", "bf16") == 2 * n
    groups = M.param_groups("Llama-2-7B")
    rest = n - groups["linear"]
    nf4 = M.weight_bytes("Llama-2-7B", "bf16", quantization="nf4")
    assert nf4 == math.ceil(groups["linear"] * double_quant_bits_per_param() / 8) + 2 * rest
    plain = M.weight_bytes("Llama-2-7B", "bf16", quantization="nf4", double_quant=False)
    assert plain == math.ceil(groups["linear"] * 4.5 / 8) + 2 * rest
    assert M.weight_bytes(1000, "fp16", quantization="nf4", double_quant=False) == 563
    # The QLoRA estimate's frozen weights are exactly these bytes.
    est = M.estimate("Llama-2-7B", method="qlora", dtype="bf16", adapter_dtype="fp32")
    assert est.weights == nf4 + est.trainable_params * 4


def test_weight_bytes_equals_a_real_fp32_model():
    model = _tiny_model()
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    assert M.weight_bytes(model.config, "fp32") == params


def test_weight_bytes_bad_inputs_say_what_to_use():
    with pytest.raises(ValueError, match=r"dtype must be one of \['bf16', 'fp16', 'fp32'\]"):
        M.weight_bytes("SmolLM2-135M", "fp8")
    with pytest.raises(ValueError, match="'nf4'"):
        M.weight_bytes("SmolLM2-135M", quantization="int3")
    with pytest.raises(ValueError, match="unknown preset"):
        M.weight_bytes("Llama-9-1B")
    with pytest.raises(TypeError, match="double_quant"):
        M.weight_bytes("SmolLM2-135M", quantization="nf4", double_quant="yes")
    with pytest.raises(ValueError, match="positive"):
        M.weight_bytes(0)


def test_estimate_unknown_dtype_lists_the_valid_ones():
    with pytest.raises(ValueError, match=r"\['bf16', 'fp16', 'fp32'\]"):
        M.estimate("SmolLM2-135M", dtype="float32")
    with pytest.raises(ValueError, match=r"\['full', 'lora', 'qlora'\]"):
        M.estimate("SmolLM2-135M", method="dora")
