"""Axolotl and LLaMA-Factory in their own environments (lesson 11; `make test-frameworks`).

The unit tests at the bottom run in every `make test`. The training tests are marked `frameworks`
and run only where the environment exists and COURSE_FRAMEWORKS=1 (which `make test-frameworks`
sets): each trains a few steps on the shipped rentals data, loads the adapter with plain PEFT in
the course environment, checks that it changes the logits and records the measured row.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
from pathlib import Path

import pytest
import torch

from course_utils import assets, framework_runs
from course_utils.framework_configs import RunSpec

ROOT = Path(__file__).resolve().parents[2]
RENTALS = ROOT / "course_utils" / "data" / "rentals_train.jsonl"
SETTINGS = {"max_steps": 3, "per_device_batch": 2, "max_length": 256}


def skip_reason(framework: str) -> str | None:
    """Why a framework's training test cannot run here, or None when it can."""
    if framework_runs.env_python(framework) is None:
        return f"no {framework} environment: `make test-frameworks` builds it and runs this test"
    if os.environ.get("COURSE_FRAMEWORKS") != "1":
        return "framework training runs only under `make test-frameworks` (COURSE_FRAMEWORKS=1)"
    return None


def max_logit_change(adapter_dir: Path) -> float:
    """Largest |logit change| the adapter makes on a prompt, loaded with plain PEFT."""
    model = assets.load_model(source="offline", device="cpu", dtype=torch.float32)
    tokenizer = assets.load_tokenizer(source="offline")
    inputs = tokenizer("Leeds: one-bed flat to let at £650 pcm.", return_tensors="pt")
    with torch.no_grad():
        before = model(**inputs).logits
        after = framework_runs.load_adapter(model, adapter_dir)(**inputs).logits
    return (after - before).abs().max().item()


@pytest.mark.frameworks
@pytest.mark.parametrize("framework", framework_runs.FRAMEWORKS)
def test_a_framework_trains_an_adapter_that_plain_peft_loads(framework, tmp_path):
    """A few steps in the framework's env give an adapter that loads in .venv and changes logits."""
    reason = skip_reason(framework)
    if reason:
        pytest.skip(reason)
    data = tmp_path / "rentals24.jsonl"
    data.write_text("".join(RENTALS.read_text().splitlines(keepends=True)[:24]))
    model = assets.model_path(source="offline")
    spec = RunSpec(model=model, data=str(data), output_dir=str(tmp_path / "out"), **SETTINGS)
    row = framework_runs.run_framework(framework, spec, tmp_path / "work")
    adapter = Path(row["adapter_dir"])
    assert all((adapter / name).exists() for name in framework_runs.ADAPTER_FILES)
    assert row["losses"] and all(math.isfinite(loss) for loss in row["losses"])
    change = max_logit_change(adapter)
    assert change > 1e-4, f"{framework}'s adapter leaves the logits unchanged (LoRA B still zero)"
    saved = {k: v for k, v in row.items() if k != "adapter_dir"}
    framework_runs.save_measurements([{**saved, **SETTINGS, "max_logit_change": change}])


ENV_CHECKS = {
    # torchaudio stays without its CUDA-linked libraries (the Makefile): it imports, reports its
    # extension unavailable and resamples in plain torch; LLaMA-Factory imports it at the top.
    "llamafactory": (
        "import torch, torchaudio, llamafactory.data.mm_plugin\n"
        "assert not torchaudio._extension._IS_TORCHAUDIO_EXT_AVAILABLE\n"
        "assert torchaudio.functional.resample(torch.ones(1, 160), 16, 8).shape == (1, 80)\n"
    ),
    "axolotl": "import axolotl.cli.train\n",
}


@pytest.mark.frameworks
@pytest.mark.parametrize("framework", framework_runs.FRAMEWORKS)
def test_each_environment_has_the_cpu_torch_and_no_cuda_torchvision(framework):
    """The environment's torch is the CPU build, torchvision is gone, the framework imports."""
    reason = skip_reason(framework)
    if reason:
        pytest.skip(reason)
    code = (
        "import importlib.util, torch\n"
        "assert torch.version.cuda is None, torch.__version__\n"
        "assert importlib.util.find_spec('torchvision') is None\n" + ENV_CHECKS[framework]
    )
    python = framework_runs.env_python(framework)
    env = framework_runs.run_env(framework, threads=1)
    done = subprocess.run([str(python), "-c", code], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]


def test_a_missing_environment_has_no_python(tmp_path):
    """A folder without a built environment gives None, so the lesson takes the fallback path."""
    for framework in framework_runs.FRAMEWORKS:
        assert framework_runs.env_python(framework, root=tmp_path) is None
    half_built = tmp_path / ".venv-axolotl" / "bin"
    half_built.mkdir(parents=True)
    (half_built / "python").touch()
    assert framework_runs.env_python("axolotl", root=tmp_path) is None  # no stamp: not finished
    (tmp_path / ".venv-axolotl" / framework_runs.STAMP).touch()
    assert framework_runs.env_python("axolotl", root=tmp_path) == half_built / "python"


def test_a_missing_environment_raises_one_sentence_naming_the_make_command(monkeypatch, tmp_path):
    """Running a framework without its environment says the one command that builds it."""
    monkeypatch.setattr(framework_runs, "env_python", lambda framework: None)
    for framework in framework_runs.FRAMEWORKS:
        with pytest.raises(FileNotFoundError) as error:
            framework_runs.run_framework(framework, None, tmp_path)
        message = str(error.value)
        assert f"`make {framework}`" in message and message.count(". ") == 0
        assert framework_runs.make_command(framework) == f"make {framework}"
    with pytest.raises(ValueError, match="Unknown framework"):
        framework_runs.make_command("unsloth")


def test_measurements_round_trip_and_merge_by_framework(tmp_path):
    """Saved rows come back with date, machine and versions; a later row replaces its own only."""
    path = tmp_path / "measured.json"
    assert framework_runs.load_measurements(path) is None
    first = {"framework": "axolotl", "version": "0.19.0", "seconds_per_step": 9.0}
    second = {"framework": "llamafactory", "version": "0.9.5", "seconds_per_step": 5.0}
    framework_runs.save_measurements([first, second], path)
    framework_runs.save_measurements([{**first, "seconds_per_step": 8.0}], path)
    table = framework_runs.load_measurements(path)
    assert table == json.loads(path.read_text())
    assert table["rows"] == [{**first, "seconds_per_step": 8.0}, second]
    assert table["versions"] == {"axolotl": "0.19.0", "llamafactory": "0.9.5"}
    assert str(os.cpu_count()) in table["machine"] and len(table["date"]) == 10


def test_the_log_parser_reads_losses_and_runtime():
    """Loss and train_runtime come from the Trainer's log dicts, quoted or not."""
    lines = [
        "{'loss': 2.5, 'grad_norm': 1.0, 'epoch': 0.1}",
        "{'loss': '1.25', 'learning_rate': '0.001'}",
        "{'train_runtime': 12.5, 'train_steps_per_second': 0.24}",
    ]
    assert framework_runs.parse_log(lines) == {"losses": [2.5, 1.25], "train_runtime": 12.5}


def test_the_process_tree_rss_counts_this_process():
    """The peak-memory probe sees at least this Python's resident memory."""
    assert framework_runs.tree_rss(os.getpid()) > 10_000_000
