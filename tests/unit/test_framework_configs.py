"""Tests for course_utils.framework_configs: one RunSpec, three frameworks, the same values."""

import ast
import dataclasses
import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
import yaml
from peft import LoraConfig
from trl import SFTConfig

from course_utils import framework_configs as fc
from course_utils.framework_configs import (
    FIELDS,
    FRAMEWORKS,
    RunSpec,
    axolotl_config,
    check_config,
    llamafactory_config,
    llamafactory_dataset_info,
    side_by_side,
    to_yaml,
    trl_arguments,
)

ROOT = Path(__file__).resolve().parents[2]
NOTEBOOK = ROOT / "notebooks" / "05_lora_lab.ipynb"
DATA = ROOT / "course_utils" / "data" / "rentals_train.jsonl"

#: A spec that differs from the default in every field.
CHANGED = {
    "model": "other/model",
    "data": "elsewhere/chats.jsonl",
    "output_dir": "runs/other",
    "lora_r": 8,
    "lora_alpha": 16,
    "lora_dropout": 0.05,
    "target_modules": "q_proj,v_proj",
    "max_steps": 10,
    "per_device_batch": 4,
    "gradient_accumulation": 2,
    "learning_rate": 2e-4,
    "lr_scheduler": "cosine",
    "warmup_steps": 2,
    "max_length": 512,
    "seed": 3,
    "logging_steps": 2,
    "precision": "bf16",
    "assistant_only": False,
}
#: Settings the spec does not choose: the same in every run the course generates.
FIXED = {
    "optimizer",
    "checkpoints during training",
    "gradient checkpointing",
    "several examples packed in one row",
}
#: SFTConfig arguments lab 05 leaves at TRL's default, set here to the same effect on a CPU.
SAME_EFFECT = {
    "completion_only_loss": True,  # None means on for lab 05's prompt/completion data
    "use_cpu": True,  # lab 05 runs on the CPU that env.pick_device finds
}


def spec(**changes):
    """The default spec (lab 05's run) with some fields changed."""
    fields = {"model": "models/smollm2", "data": str(DATA), "output_dir": "runs/lab05"}
    return RunSpec(**(fields | changes))


def _calls(name):
    """Every call of `name(...)` in lab 05's code cells, with the setup cell's constants."""
    cells = json.loads(NOTEBOOK.read_text())["cells"]
    sources = ["".join(c["source"]) for c in cells if c["cell_type"] == "code"]
    found = []
    for source in sources:
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == name:
                found.append(node)
    return found, sources


def _constants(sources):
    """Module-level NAME = literal (or env.by_profile(full=...)) assignments of the notebook."""
    values = {}
    for source in sources:
        for node in ast.parse(source).body:
            if not (isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name)):
                continue
            value = node.value
            if isinstance(value, ast.Call) and getattr(value.func, "attr", "") == "by_profile":
                value = next(k.value for k in value.keywords if k.arg == "full")
            try:
                values[node.targets[0].id] = ast.literal_eval(value)
            except ValueError:
                pass
    return values


def lab_kwargs(name):
    """The keyword arguments of lab 05's main-run `name(...)` call, evaluated as on a CPU."""
    calls, sources = _calls(name)
    scope = _constants(sources) | {
        "torch": torch,
        "DTYPE": torch.float32,
        "device": torch.device("cpu"),
    }
    kwargs = {}
    for keyword in calls[0].keywords:
        if keyword.arg == "output_dir":
            continue
        expression = ast.Expression(keyword.value)
        kwargs[keyword.arg] = eval(compile(expression, NOTEBOOK.name, "eval"), scope)
    return kwargs


# --- lab 05's values --------------------------------------------------------------------------


def test_lora_kwargs_are_lab_05s():
    lora, _ = trl_arguments(spec())
    assert lora == lab_kwargs("LoraConfig")


def test_sft_kwargs_are_lab_05s_and_the_rest_trl_defaults():
    _, sft = trl_arguments(spec())
    lab = lab_kwargs("SFTConfig")
    assert {k: sft[k] for k in lab} == lab
    defaults = {f.name: f.default for f in dataclasses.fields(SFTConfig)}
    extra = {k: v for k, v in sft.items() if k not in lab and k != "output_dir"}
    assert {k: v for k, v in extra.items() if k not in SAME_EFFECT} == {
        k: defaults[k] for k in extra if k not in SAME_EFFECT
    }
    assert {k: extra[k] for k in SAME_EFFECT} == SAME_EFFECT


def test_the_spec_defaults_are_the_lab_values():
    lab_lora, lab_sft = lab_kwargs("LoraConfig"), lab_kwargs("SFTConfig")
    run = spec()
    assert (run.lora_r, run.lora_alpha) == (lab_lora["r"], lab_lora["lora_alpha"])
    assert (run.lora_dropout, run.target_modules) == (
        lab_lora["lora_dropout"],
        lab_lora["target_modules"],
    )
    assert (run.max_steps, run.per_device_batch, run.learning_rate) == (
        lab_sft["max_steps"],
        lab_sft["per_device_train_batch_size"],
        lab_sft["learning_rate"],
    )
    assert (run.lr_scheduler, run.warmup_steps, run.seed, run.logging_steps) == (
        lab_sft["lr_scheduler_type"],
        lab_sft["warmup_steps"],
        lab_sft["seed"],
        lab_sft["logging_steps"],
    )
    defaults = {f.name: f.default for f in dataclasses.fields(SFTConfig)}
    assert run.max_length == defaults["max_length"]  # lab 05 keeps TRL's
    assert run.gradient_accumulation == defaults["gradient_accumulation_steps"]
    assert run.precision == "fp32" and lab_sft["bf16"] is False and lab_sft["fp16"] is False


def test_the_trl_kwargs_build_real_configs(tmp_path):
    run = spec(output_dir=str(tmp_path / "run"))
    lora_kwargs, sft_kwargs = trl_arguments(run)
    lora, sft = LoraConfig(**lora_kwargs), SFTConfig(**sft_kwargs)
    assert (lora.r, lora.lora_alpha, lora.lora_dropout) == (16, 32, 0.0)
    assert lora.target_modules == "all-linear"
    assert (sft.max_steps, sft.per_device_train_batch_size, sft.learning_rate) == (28, 8, 1e-3)
    assert (sft.gradient_accumulation_steps, sft.max_length, sft.seed) == (1, 1024, 0)
    assert sft.lr_scheduler_type == "linear" and sft.warmup_steps == 0
    assert sft.output_dir == run.output_dir and sft.bf16 is False and sft.use_cpu is True
    assert sft.completion_only_loss is True and sft.gradient_checkpointing is False
    assert sft.save_strategy == "no"


def test_changed_trl_kwargs_reach_the_real_configs(tmp_path):
    run = spec(output_dir=str(tmp_path / "run"), lora_r=8, max_steps=5, target_modules="q_proj")
    lora_kwargs, sft_kwargs = trl_arguments(run)
    lora, sft = LoraConfig(**lora_kwargs), SFTConfig(**sft_kwargs)
    assert lora.r == 8 and lora.target_modules == {"q_proj"} and sft.max_steps == 5


# --- the three frameworks agree ---------------------------------------------------------------


@pytest.mark.parametrize("changes", [{}, CHANGED], ids=["lab05", "changed"])
def test_every_field_has_one_value_in_the_three_configs(changes):
    for row in side_by_side(spec(**changes)):
        values = [row[framework] for framework in FRAMEWORKS]
        assert values[0] == values[1] == values[2], row


def test_the_lab_values_appear_in_all_three():
    table = {row["concept"]: row for row in side_by_side(spec())}
    expected = {
        "LoRA rank r": 16,
        "LoRA alpha (scale alpha/r)": 32,
        "learning rate": 1e-3,
        "optimizer steps": 28,
        "examples per step and device": 8,
        "layers that get an adapter": "all-linear",
        "loss on the assistant's answer only": True,
        "precision": "fp32",
    }
    for concept, value in expected.items():
        assert [table[concept][f] for f in FRAMEWORKS] == [value] * 3, concept
    lora, sft = trl_arguments(spec())
    assert (lora["r"], sft["max_steps"], sft["per_device_train_batch_size"]) == (16, 28, 8)
    ax = axolotl_config(spec())
    assert (ax["lora_r"], ax["lora_alpha"], ax["learning_rate"]) == (16, 32, 1e-3)
    assert (ax["max_steps"], ax["micro_batch_size"]) == (28, 8)
    lf = llamafactory_config(spec(), "data")
    assert (lf["lora_rank"], lf["lora_alpha"], lf["learning_rate"]) == (16, 32, 1e-3)
    assert (lf["max_steps"], lf["per_device_train_batch_size"]) == (28, 8)


def test_a_changed_spec_changes_every_framework():
    before = {row["concept"]: row for row in side_by_side(spec())}
    after = {row["concept"]: row for row in side_by_side(RunSpec(**CHANGED))}
    for concept, row in after.items():
        for framework in FRAMEWORKS:
            if concept in FIXED:
                assert row[framework] == before[concept][framework], (concept, framework)
            else:
                assert row[framework] != before[concept][framework], (concept, framework)


def test_a_smaller_rank_reaches_all_three():
    run = spec(lora_r=8)
    assert trl_arguments(run)[0]["r"] == 8
    assert axolotl_config(run)["lora_r"] == 8
    assert llamafactory_config(run, "data")["lora_rank"] == 8


def test_fields_name_real_keys_of_each_config():
    run = RunSpec(**CHANGED)
    lora, sft = trl_arguments(run)
    for field in FIELDS:
        if field.trl.startswith("LoraConfig."):
            assert field.trl.split(".", 1)[1].split(" ")[0] in lora
        if field.trl.startswith("SFTConfig."):
            assert field.trl.split(".", 1)[1].split(" ")[0] in sft
    keys = set(axolotl_config(run)) | set(llamafactory_config(run, "data"))
    for field in FIELDS[2:]:  # after the model and the data rows
        assert field.axolotl.split(" ")[0] in keys, field
        assert field.llamafactory.split(" ")[0] in keys, field


def test_read_field_takes_only_the_three_frameworks():
    with pytest.raises(ValueError, match="framework must be one of"):
        fc.read_field(FIELDS[0], "unsloth", {})


# --- Axolotl and LLaMA-Factory specifics ------------------------------------------------------


def test_axolotl_turns_the_cuda_kernels_off():
    config = axolotl_config(spec())
    for key in ("lora_mlp_kernel", "lora_qkv_kernel", "lora_o_kernel", "lora_embedding_kernel"):
        assert config[key] is False, key
    assert config["attn_implementation"] == "sdpa"
    assert not {"flash_attention", "sdp_attention", "xformers_attention"} & set(config)


def test_axolotl_trains_on_the_answer_only():
    dataset = axolotl_config(spec())["datasets"][0]
    assert dataset["type"] == "chat_template" and dataset["field_messages"] == "messages"
    assert dataset["chat_template"] == "tokenizer_default"
    assert dataset["roles_to_train"] == ["assistant"] and dataset["train_on_eos"] == "turn"
    assert axolotl_config(spec())["train_on_inputs"] is False
    assert axolotl_config(spec(assistant_only=False))["train_on_inputs"] is True


def test_axolotl_saves_only_at_the_end_and_keeps_every_row():
    config = axolotl_config(spec())
    assert config["save_strategy"] == "no" and "save_steps" not in config
    assert config["val_set_size"] == 0 and config["excess_length_strategy"] == "truncate"
    assert config["adapter"] == "lora" and config["lora_target_linear"] is True


def test_llamafactory_config_and_dataset_info_match():
    config = llamafactory_config(spec(), "/tmp/lf", dataset_name="rentals")
    info = llamafactory_dataset_info(spec(), dataset_name="rentals")
    assert config["dataset"] == "rentals" and list(info) == ["rentals"]
    assert config["dataset_dir"] == "/tmp/lf"
    assert info["rentals"] == {
        "file_name": str(DATA),
        "formatting": "sharegpt",
        "columns": {"messages": "messages"},
        "tags": {
            "role_tag": "role",
            "content_tag": "content",
            "user_tag": "user",
            "assistant_tag": "assistant",
            "system_tag": "system",
        },
    }
    assert (config["stage"], config["finetuning_type"], config["template"]) == (
        "sft",
        "lora",
        "smollm2",
    )
    assert config["do_train"] is True and config["train_on_prompt"] is False
    assert config["lora_target"] == "all" and config["report_to"] == "none"
    assert config["save_strategy"] == "no" and config["overwrite_output_dir"] is True
    assert config["disable_gradient_checkpointing"] is True


def test_the_sharegpt_tags_cover_the_data_roles():
    tags = llamafactory_dataset_info(spec())["course_chats"]["tags"]
    first = json.loads(DATA.read_text().splitlines()[0])
    roles = {message["role"] for message in first["messages"]}
    assert roles <= {tags["user_tag"], tags["assistant_tag"], tags["system_tag"]}
    assert set(first["messages"][0]) == {tags["role_tag"], tags["content_tag"]}


def test_llamafactory_uses_the_cpu_in_fp32_only():
    assert llamafactory_config(spec(), "d")["use_cpu"] is True
    bf16 = llamafactory_config(spec(precision="bf16"), "d")
    assert "use_cpu" not in bf16 and bf16["bf16"] is True and bf16["fp16"] is False


def test_a_relative_data_path_becomes_absolute():
    run = spec(data="chats.jsonl")
    path = os.path.abspath("chats.jsonl")
    assert llamafactory_dataset_info(run)["course_chats"]["file_name"] == path
    assert axolotl_config(run)["datasets"][0]["path"] == path


# --- YAML and check_config --------------------------------------------------------------------


@pytest.mark.parametrize("changes", [{}, CHANGED], ids=["lab05", "changed"])
def test_yaml_round_trips(changes):
    run = spec(**changes)
    for config in (
        axolotl_config(run),
        llamafactory_config(run, "data"),
        llamafactory_dataset_info(run),
    ):
        text = to_yaml(config)
        assert yaml.safe_load(text) == config
        assert list(yaml.safe_load(text)) == list(config)  # keys keep their order


@pytest.mark.parametrize("changes", [{}, CHANGED], ids=["lab05", "changed"])
def test_generated_configs_pass_check_config(changes):
    run = spec(**changes)
    lora, sft = trl_arguments(run)
    check_config("peft", lora)
    check_config("trl", sft)
    check_config("axolotl", axolotl_config(run))
    check_config("llamafactory", llamafactory_config(run, "data"))
    check_config("llamafactory_dataset", llamafactory_dataset_info(run)["course_chats"])


def test_trl_and_peft_keys_are_real_fields():
    assert set(fc.TRL_KEYS) <= {f.name for f in dataclasses.fields(SFTConfig)}
    assert set(fc.PEFT_KEYS) <= {f.name for f in dataclasses.fields(LoraConfig)}


def _one_sentence(message):
    """Whether an error message is one sentence: no full stop before its end, no new line."""
    return "\n" not in message and ". " not in message.rstrip(".")


@pytest.mark.parametrize(
    ("framework", "key", "hint"),
    [("axolotl", "lora_rank", "lora_r"), ("llamafactory", "lora_r", "lora_rank")],
)
def test_an_unknown_key_is_named_with_a_suggestion(framework, key, hint):
    config = axolotl_config(spec()) if framework == "axolotl" else llamafactory_config(spec(), "d")
    config[key] = 8
    with pytest.raises(KeyError) as error:
        check_config(framework, config)
    assert repr(key) in str(error.value) and repr(hint) in str(error.value)
    assert _one_sentence(str(error.value))


def test_an_unknown_dataset_key_is_caught():
    config = axolotl_config(spec())
    config["datasets"][0]["feild_messages"] = "messages"
    with pytest.raises(KeyError, match="field_messages"):
        check_config("axolotl", config)


@pytest.mark.parametrize(
    ("framework", "key", "value"),
    [
        ("axolotl", "lora_r", "16"),
        ("axolotl", "lora_target_linear", "yes"),
        ("axolotl", "micro_batch_size", True),
        ("llamafactory", "learning_rate", "1e-3"),
        ("llamafactory", "bf16", 1),
        ("trl", "max_steps", 2.5),
    ],
)
def test_a_value_of_the_wrong_kind_is_named(framework, key, value):
    with pytest.raises(TypeError) as error:
        check_config(framework, {key: value})
    assert repr(key) in str(error.value) and _one_sentence(str(error.value))


def test_yaml_reads_1e_3_as_text_and_check_config_says_so():
    config = yaml.safe_load("learning_rate: 1e-3")
    with pytest.raises(TypeError, match="1.0e-3"):
        check_config("llamafactory", config)


def test_check_config_rejects_an_unknown_framework():
    with pytest.raises(ValueError, match="framework must be one of"):
        check_config("deepspeed", {})


@pytest.mark.parametrize(
    "changes",
    [
        {"lora_r": 0},
        {"lora_r": 8.0},
        {"lora_alpha": -1},
        {"lora_dropout": 1.0},
        {"max_steps": 0},
        {"per_device_batch": True},
        {"learning_rate": 0},
        {"lr_scheduler": "cosin"},
        {"precision": "fp8"},
        {"warmup_steps": 1},
        {"warmup_steps": -2},
        {"warmup_steps": 28},
        {"assistant_only": "yes"},
        {"target_modules": ""},
        {"seed": -1},
    ],
)
def test_a_bad_spec_is_refused_in_one_sentence(changes):
    with pytest.raises(ValueError) as error:
        spec(**changes)
    assert _one_sentence(str(error.value)), str(error.value)


def test_a_bad_dataset_name_is_refused():
    with pytest.raises(ValueError, match="without commas"):
        llamafactory_config(spec(), "d", dataset_name="a,b")


# --- the real frameworks, where `make axolotl` / `make llamafactory` built them ---------------

AXOLOTL_CHECK = """
import json, sys
from axolotl.utils.config import validate_config
from axolotl.utils.dict import DictDefault
from axolotl.utils.schemas.config import AxolotlInputConfig
from axolotl.utils.schemas.datasets import SFTDataset
keys, configs = json.load(sys.stdin)
fields, dataset_fields = set(AxolotlInputConfig.model_fields), set(SFTDataset.model_fields)
out = {"unknown": [k for k in keys[0] if k not in fields]
       + [k for k in keys[1] if k not in dataset_fields], "parsed": []}
for config in configs:
    cfg = validate_config(DictDefault(config))
    out["parsed"].append({k: cfg[k] for k in ("lora_r", "lora_alpha", "micro_batch_size",
        "max_steps", "learning_rate", "lr_scheduler", "lora_mlp_kernel", "train_on_inputs")})
print("RESULT" + json.dumps(out))
"""

LLAMAFACTORY_CHECK = """
import dataclasses, json, sys
from llamafactory.hparams import get_train_args
from llamafactory.hparams.parser import _TRAIN_ARGS
keys, configs = json.load(sys.stdin)
fields = {f.name for cls in _TRAIN_ARGS for f in dataclasses.fields(cls)}
out = {"unknown": [k for k in keys[0] if k not in fields], "parsed": []}
for config in configs:
    model, data, train, tuning, _ = get_train_args(config)
    out["parsed"].append({"lora_r": tuning.lora_rank, "lora_alpha": tuning.lora_alpha,
        "micro_batch_size": train.per_device_train_batch_size, "max_steps": train.max_steps,
        "learning_rate": train.learning_rate, "lr_scheduler": str(train.lr_scheduler_type.value),
        "train_on_prompt": data.train_on_prompt, "use_cpu": train.use_cpu})
print("RESULT" + json.dumps(out))
"""


def framework_python(framework):
    """The Python of a finished framework environment, or None (then the test is skipped)."""
    folder = ROOT / f".venv-{framework}"
    python = folder / "bin" / "python"
    return python if python.exists() and (folder / ".course-installed").exists() else None


def run_in(framework, script, payload):
    """Run `script` in the framework's environment with `payload` as JSON on stdin."""
    python = framework_python(framework)
    if python is None:
        pytest.skip(f"no {framework} environment here (`make {framework}` builds it)")
    done = subprocess.run(
        [str(python), "-c", script],
        input=json.dumps(payload),
        capture_output=True,
        text=True,
        timeout=300,
        env=os.environ | {"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.split("RESULT", 1)[1])


def test_axolotl_0_19_accepts_the_generated_configs(tmp_path):
    runs = [spec(output_dir=str(tmp_path / "a")), spec(**(CHANGED | {"output_dir": str(tmp_path)}))]
    keys = [list(fc.AXOLOTL_KEYS), list(fc.AXOLOTL_DATASET_KEYS)]
    result = run_in("axolotl", AXOLOTL_CHECK, [keys, [axolotl_config(r) for r in runs]])
    assert result["unknown"] == []
    for run, parsed in zip(runs, result["parsed"]):
        assert parsed == {
            "lora_r": run.lora_r,
            "lora_alpha": run.lora_alpha,
            "micro_batch_size": run.per_device_batch,
            "max_steps": run.max_steps,
            "learning_rate": run.learning_rate,
            "lr_scheduler": run.lr_scheduler,
            "lora_mlp_kernel": False,
            "train_on_inputs": not run.assistant_only,
        }


def test_llamafactory_0_9_5_accepts_the_generated_configs(tmp_path):
    changed = CHANGED | {"output_dir": str(tmp_path), "precision": "fp32"}  # bf16 needs a GPU
    runs = [spec(output_dir=str(tmp_path / "a")), spec(**changed)]
    configs = [llamafactory_config(r, str(tmp_path)) for r in runs]
    payload = [[list(fc.LLAMAFACTORY_KEYS)], configs]
    result = run_in("llamafactory", LLAMAFACTORY_CHECK, payload)
    assert result["unknown"] == []
    for run, parsed in zip(runs, result["parsed"]):
        assert parsed == {
            "lora_r": run.lora_r,
            "lora_alpha": run.lora_alpha,
            "micro_batch_size": run.per_device_batch,
            "max_steps": run.max_steps,
            "learning_rate": run.learning_rate,
            "lr_scheduler": run.lr_scheduler,
            "train_on_prompt": not run.assistant_only,
            "use_cpu": run.precision == "fp32",
        }
