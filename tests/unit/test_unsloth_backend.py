"""Tests for course_utils.unsloth_backend: Unsloth loads, adds LoRA and says which backend ran.

The training itself goes through the bench's real subprocess (tests/tools/test_bench_training.py, the
``unsloth-lora`` workload); here: the backend report, loading a tiny Llama from a folder through
``FastLanguageModel``, LoRA on it, and bad input.
"""

import importlib.util
import json
import subprocess
import sys

import pytest
import torch

from course_utils import memory, unsloth_backend

# Importing Unsloth patches transformers and TRL for the whole process, so everything that
# imports it runs in a child process: the other tests in this session keep the stock libraries.
CHILD = r"""
import json, sys, torch
from course_utils import memory, unsloth_backend
from course_utils.assets import load_tokenizer
from course_tools.bench.common import tiny_model as _tiny_model

folder = sys.argv[1]
unsloth = unsloth_backend.import_unsloth()
tokenizer = load_tokenizer()
_tiny_model(torch.float32, torch.device("cpu"), False, len(tokenizer)).save_pretrained(folder)
tokenizer.save_pretrained(folder)
out = {"version": unsloth.__version__, "device_type": unsloth.DEVICE_TYPE}
out["bare"] = unsloth_backend.backend()
out["bare_line"] = unsloth_backend.describe()
model, loaded_tokenizer = unsloth_backend.load_model(folder, max_seq_length=64)
out["loaded"] = unsloth_backend.backend(model)
out["loaded_line"] = unsloth_backend.describe(model)
out["pad_token"] = loaded_tokenizer.pad_token
out["formula"] = memory.lora_trainable_params(model.config, r=4, targets="all-linear")
peft_model = unsloth_backend.get_peft_model(model, r=4)
out["trainable"] = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
out["trained_names"] = sorted(
    {n.split(".")[-3] for n, p in peft_model.named_parameters() if p.requires_grad}
)
out["wrapped"] = unsloth_backend.backend(peft_model)

# The CPU fallback's cross-entropy: the chunk it picks for SmolLM2's vocabulary, and its peak.
from course_utils.peak_memory import PeakMemory
from unsloth_zoo.cpu import ops

chunks = []
real_apply = ops._ChunkedLinearCrossEntropy.apply
def spy(hidden, weight, labels, divisor, chunk_rows, ignore_index):
    chunks.append(chunk_rows)
    return real_apply(hidden, weight, labels, divisor, chunk_rows, ignore_index)
ops._ChunkedLinearCrossEntropy.apply = spy
gen = torch.Generator().manual_seed(0)
hidden = torch.randn(1, 1025, 16, generator=gen, requires_grad=True)
weight = torch.randn(49152, 16, generator=gen, requires_grad=True)
labels = torch.randint(0, 49152, (1, 1025), generator=gen)
with PeakMemory() as peak:
    ops.chunked_linear_cross_entropy(hidden, weight, labels).backward()
out["ce_chunk_rows"], out["ce_peak"] = chunks[0], peak.peak
print("RESULT" + json.dumps(out))
"""


@pytest.fixture(scope="module")
def child(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny")
    done = subprocess.run(
        [sys.executable, "-c", CHILD, str(folder)], capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    line = next(x for x in done.stdout.splitlines() if x.startswith("RESULT"))
    return json.loads(line.removeprefix("RESULT"))


def test_the_backend_is_read_from_unsloth_and_follows_the_device(child):
    info = child["bare"]
    assert info["device_type"] == child["device_type"]
    assert info["cpu_fallback"] == (not torch.cuda.is_available())
    assert info["unsloth"] == child["version"]
    line = child["bare_line"]
    assert ("CPU fallback" in line) == info["cpu_fallback"] and child["version"] in line


def test_a_model_folder_loads_in_the_course_dtype_with_unsloths_chunked_loss(child):
    info = child["loaded"]
    assert info["dtype"] == "float32"  # not Unsloth's CPU default, bf16
    assert info["device"] == "cpu"
    assert info["chunked_cross_entropy"] is True
    assert "chunked CE on" in child["loaded_line"]
    assert child["pad_token"]


def test_lora_through_unsloth_trains_what_the_formula_says(child):
    assert child["trainable"] == child["formula"]
    assert child["trained_names"] == ["lora_A", "lora_B"]
    # the backend report sees through the PEFT wrapper
    assert child["wrapped"]["chunked_cross_entropy"] is True


def test_the_cpu_cross_entropy_holds_the_chunk_the_estimator_counts(child):
    assert child["ce_chunk_rows"] == memory.loss_chunk_tokens("unsloth_cpu", 49152)
    predicted = memory._logit_bytes(49152, 1024, "unsloth_cpu")
    assert child["ce_peak"] == pytest.approx(predicted, rel=0.1)


def test_bad_arguments_say_what_to_pass(tmp_path):
    with pytest.raises(FileNotFoundError, match="location=None"):
        unsloth_backend.load_model(tmp_path / "missing")
    with pytest.raises(ValueError, match="max_seq_length"):
        unsloth_backend.load_model(tmp_path, max_seq_length=0)
    with pytest.raises(ValueError, match="load_in_4bit"):
        unsloth_backend.load_model(tmp_path, load_in_4bit="yes")
    with pytest.raises(ValueError, match="dtype"):
        unsloth_backend.load_model(tmp_path, dtype=torch.int8)
    with pytest.raises(ValueError, match="r \\(the LoRA rank\\)"):
        unsloth_backend.get_peft_model(torch.nn.Linear(2, 2), r=0)
    with pytest.raises(ValueError, match="alpha"):
        unsloth_backend.get_peft_model(torch.nn.Linear(2, 2), alpha=-1)
    with pytest.raises(ValueError, match="target_modules"):
        unsloth_backend.get_peft_model(torch.nn.Linear(2, 2), target_modules="all-linear")


def test_a_missing_unsloth_gets_the_install_command(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "unsloth" else real(name, *a)
    )
    with pytest.raises(ImportError, match="make setup"):
        unsloth_backend.import_unsloth()
