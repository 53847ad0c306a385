"""Tests for course_utils.model_choice: serving memory, the KV cache and decode speed, by hand."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from course_utils import assets
from course_utils import memory as M
from course_utils import model_choice as C

# TINY_LLAMA by hand: hidden 64, intermediate 128, 2 layers, 4 heads of 16, 2 KV heads, vocab 256
TINY = assets.TINY_LLAMA
TINY_LINEAR = 2 * (64 * 64 + 2 * 64 * 32 + 64 * 64 + 3 * 64 * 128)  # 73,728 weights
TINY_ROWS = 2 * (64 + 32 + 32 + 64 + 128 + 128 + 64)  # 1,024 output rows
TINY_REST = 256 * 64 + 2 * 2 * 64 + 64  # tied embeddings, 2 norms a layer, final norm: 16,704


# ------------------------------------------------------------------------------ the KV cache


def test_kv_cache_bytes_by_hand():
    # 2 (key, value) x 30 layers x 3 KV heads x 64 x 4096 tokens x 2 bytes
    assert C.kv_cache_bytes("SmolLM2-135M", 4096) == 2 * 30 * 3 * 64 * 4096 * 2 == 94_371_840
    # SmolLM2-1.7B has no grouped-query attention: 32 KV heads
    assert C.kv_cache_bytes("SmolLM2-1.7B", 4096) == 2 * 24 * 32 * 64 * 4096 * 2 == 805_306_368
    assert C.kv_cache_bytes("SmolLM2-135M", 10, batch=3, dtype="fp32") == 11_520 * 10 * 3 * 4


def test_kv_cache_bytes_equals_a_real_cache():
    model = assets.tiny_llama().eval()
    with torch.no_grad():
        cache = model(torch.randint(0, 256, (2, 10)), use_cache=True).past_key_values
    real = sum(
        t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values)
    )
    assert real == C.kv_cache_bytes(TINY, 10, batch=2, dtype="fp32") == 2 * 2 * 2 * 16 * 10 * 2 * 4


# ------------------------------------------------------------------------------ serving memory


def test_serving_weight_bytes_by_hand():
    assert C.serving_weight_bytes(TINY, "bf16") == (TINY_LINEAR + TINY_REST) * 2 == 180_864
    # int8: one byte a linear weight, an fp32 scale a row, the rest bf16
    assert C.serving_weight_bytes(TINY, "int8") == TINY_LINEAR + 4 * TINY_ROWS + 2 * TINY_REST
    assert C.serving_weight_bytes(TINY, "int8") == 111_232
    assert C.serving_weight_bytes(TINY, "4-bit") == M.weight_bytes(TINY, "bf16", "nf4")
    sizes = [C.serving_weight_bytes("Mistral-7B", f) for f in C.SERVING_FORMATS]
    assert sizes == sorted(sizes, reverse=True)


def test_serving_bytes_is_weights_plus_cache():
    total = C.serving_bytes("SmolLM2-1.7B", "4-bit", context_tokens=4096)
    weights = C.serving_weight_bytes("SmolLM2-1.7B", "4-bit")
    assert total == weights + 805_306_368


# ------------------------------------------------------------------------------ the configs


def test_added_configs_count_what_their_model_cards_state():
    # the hub pages state 362M, 1.71B and 3.21B parameters
    assert M.count_params(C.config_of("SmolLM2-360M")) == 361_821_120
    assert M.count_params(C.config_of("SmolLM2-1.7B")) == 1_711_376_384
    assert M.count_params(C.config_of("Llama-3.2-3B")) == 3_212_749_824


@pytest.mark.parametrize("name", sorted(C.CONFIGS))
def test_added_configs_build_a_real_model_of_the_same_size(name):
    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig(**C.CONFIGS[name]))
    n_embedding = model.get_input_embeddings().weight.numel()
    real = sum(p.numel() for p in model.parameters())
    if model.lm_head.weight is not model.get_input_embeddings().weight:
        real -= n_embedding  # tied on the hub: the head is the embedding
    assert real == M.count_params(C.CONFIGS[name])


def test_every_candidate_has_a_config_and_a_sourced_card():
    assert set(C.CONFIG_SOURCES) == set(C.CONFIGS)
    for name, card in C.MODEL_CARDS.items():
        assert M.count_params(C.config_of(name)) > 0
        assert card.source.startswith("https://huggingface.co/")
        assert card.context_tokens > 0 and card.licence
    assert C.MODEL_CARDS["SmolLM2-135M"].licence == "Apache-2.0"


# ------------------------------------------------------------------------------ decode speed


def test_decode_speed_by_hand():
    # 320 GB/s over 270 MB of weights: 1185 tokens per second at most
    assert C.decode_tokens_per_second(270e6, 320e9) == pytest.approx(1185.185, rel=1e-6)
    assert C.effective_bandwidth(538e6, 8.0) == pytest.approx(4.304e9)
    bandwidth = C.effective_bandwidth(538e6, 8.0)
    assert C.decode_tokens_per_second(4 * 538e6, bandwidth) == pytest.approx(2.0)


def test_measure_decode_on_a_tiny_model(tokenizer):
    model = assets.tiny_llama(tokenizer)
    speed = C.measure_decode(model, tokenizer, "Say hello.", new_tokens=5)
    assert speed.new_tokens == 5 and speed.prompt_tokens > 3
    assert speed.total_seconds > 0 and speed.first_token_seconds > 0
    assert speed.tokens_per_second > 0
    assert model.training  # left as it was found


# ------------------------------------------------------------------------------ bad input


def test_bad_input_says_what_to_pass(tokenizer):
    with pytest.raises(ValueError, match="unknown model 'GPT-5'"):
        C.kv_cache_bytes("GPT-5", 10)
    with pytest.raises(ValueError, match="tokens must be a positive integer"):
        C.kv_cache_bytes("SmolLM2-135M", 0)
    with pytest.raises(ValueError, match="weights must be one of"):
        C.serving_weight_bytes("SmolLM2-135M", "int4")
    with pytest.raises(ValueError, match="bandwidth must be a positive number"):
        C.decode_tokens_per_second(1e9, 0)
    with pytest.raises(TypeError, match="tokens_per_second must be a positive number"):
        C.effective_bandwidth(1e9, "fast")
    model = assets.tiny_llama(tokenizer)
    with pytest.raises(ValueError, match="at least 2"):
        C.measure_decode(model, tokenizer, "Hi", new_tokens=1)
    with pytest.raises(ValueError, match="non-empty string"):
        C.measure_decode(model, tokenizer, "  ")
