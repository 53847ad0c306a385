"""One run, three frameworks: lab 05's LoRA run as TRL arguments, an Axolotl and a LLaMA-Factory YAML.

Lesson 11 (frameworks).

A :class:`RunSpec` describes the run once, with lab 05's values as defaults. Three functions
write what each framework reads:

* :func:`trl_arguments`: the ``LoraConfig`` and ``SFTConfig`` keyword arguments of a TRL script;
* :func:`axolotl_config`: an Axolotl YAML (as a dict; :func:`to_yaml` writes it);
* :func:`llamafactory_config` and :func:`llamafactory_dataset_info`: a LLaMA-Factory YAML and
  the entry its ``dataset_info.json`` needs to find the chat JSONL.

The YAMLs are generated from the one description, so they cannot drift. :data:`FIELDS` lists each
setting with its name in the three frameworks and how to read it back; :func:`side_by_side`
shows the three values of each, and the tests prove they agree. :func:`check_config` catches a
misspelt key or a value of the wrong kind in a hand-edited config, in one sentence.

Every key name was checked against the frameworks' own source:

* Axolotl 0.19.0 (the PyPI wheel): ``axolotl/utils/schemas/{config,training,peft,model,
  datasets}.py``, the chat-template strategy ``prompt_strategies/chat_template.py`` and the
  trainer builder ``core/builders/base.py``;
* LLaMA-Factory 0.9.5 (the PyPI wheel): ``llamafactory/hparams/{model,data,finetuning,
  training}_args.py`` (the rest are transformers' ``Seq2SeqTrainingArguments``),
  ``hparams/parser.py``, ``data/parser.py`` (``dataset_info.json``) and ``data/template.py``
  (``smollm2``);
* TRL 1.14 and PEFT 0.21 as installed: the tests build real ``SFTConfig`` and ``LoraConfig``.

Where ``make axolotl`` and ``make llamafactory`` have built their environments, the tests also
hand the generated configs to Axolotl's ``validate_config`` and LLaMA-Factory's
``get_train_args`` and read the values back.

What the source says beyond the probe that first ran these configs on a CPU:

* Axolotl turns the LoRA kernels on by itself (``check_auto_enable_lora_kernels``) unless each
  ``lora_*_kernel`` key is set; they need CUDA, hence the four ``false``.
* Axolotl 0.19 deprecates ``flash_attention``/``sdp_attention``/``xformers_attention``: its
  ``normalize_attn_implementation`` drops them, so ``false`` does nothing. The attention is
  chosen with ``attn_implementation``; ``sdpa`` is what transformers gives lab 05 by default.
* Axolotl drops over-long rows unless told otherwise; TRL and LLaMA-Factory truncate them, so
  the Axolotl config says ``excess_length_strategy: truncate``.
* Axolotl turns ``warmup_steps: 1`` into 2, so :class:`RunSpec` refuses a warmup of 1 step.
* LLaMA-Factory turns gradient checkpointing on by default; lab 05 has it off, so the config says
  ``disable_gradient_checkpointing: true``.
* LLaMA-Factory never reads ``use_cpu`` itself (it is transformers' field) and puts the model on
  any accelerator it finds, in bf16 when the GPU has it, unless ``bf16``/``fp16`` say otherwise.
  The course runs fp32 on a CPU only, so fp32 here means a CPU run (``use_cpu: true``).
* Lab 05 trains with TRL's default optimizer, ``adamw_torch_fused``, which is Axolotl's default
  too; all three configs name it (``optim``/``optimizer``), not ``adamw_torch``.
* Lab 05 leaves TRL's ``max_length`` at its default, 1024 (no rentals example exceeds 170
  tokens), so the spec's default is 1024.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from numbers import Integral, Real
from typing import Any, NamedTuple

import yaml

from .checks import WrongType, flag, fraction, one_of, positive_int, positive_number

__all__ = [
    "AXOLOTL_DATASET_KEYS",
    "AXOLOTL_KEYS",
    "CONFIG_KEYS",
    "FIELDS",
    "FRAMEWORKS",
    "LLAMAFACTORY_DATASET_KEYS",
    "LLAMAFACTORY_KEYS",
    "PEFT_KEYS",
    "Field",
    "RunSpec",
    "TRL_KEYS",
    "UnknownKey",
    "axolotl_config",
    "check_config",
    "llamafactory_config",
    "llamafactory_dataset_info",
    "read_field",
    "side_by_side",
    "to_yaml",
    "trl_arguments",
]

#: Learning-rate schedules that TRL, Axolotl and LLaMA-Factory all take by the same name.
SCHEDULERS = (
    "linear",
    "cosine",
    "cosine_with_restarts",
    "polynomial",
    "constant",
    "constant_with_warmup",
    "inverse_sqrt",
)
PRECISIONS = ("fp32", "bf16", "fp16")
#: Lab 05's optimizer: TRL's default, and Axolotl's (AdamW, one fused kernel for all parameters).
OPTIMIZER = "adamw_torch_fused"
#: The attention that transformers picks for SmolLM2 when lab 05 loads it.
ATTENTION = "sdpa"


@dataclass(frozen=True)
class RunSpec:
    """One LoRA fine-tuning run, described once; the defaults are lab 05's."""

    model: str
    data: str
    output_dir: str
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.0
    target_modules: str = "all-linear"
    max_steps: int = 28
    per_device_batch: int = 8
    gradient_accumulation: int = 1
    learning_rate: float = 1e-3
    lr_scheduler: str = "linear"
    warmup_steps: int = 0
    max_length: int = 1024
    seed: int = 0
    logging_steps: int = 1
    precision: str = "fp32"
    assistant_only: bool = True

    def __post_init__(self) -> None:
        """Check every field, saying in one sentence what to pass instead."""
        for name in ("model", "data", "output_dir", "target_modules"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value.strip():
                raise WrongType(f"{name} must be a non-empty string (got {value!r}).")
        for name, example in (
            ("lora_r", "lora_r=16"),
            ("lora_alpha", "lora_alpha=32"),
            ("max_steps", "max_steps=28"),
            ("per_device_batch", "per_device_batch=8"),
            ("gradient_accumulation", "gradient_accumulation=1"),
            ("max_length", "max_length=1024"),
            ("logging_steps", "logging_steps=1"),
        ):
            positive_int(getattr(self, name), name, example)
        fraction(self.lora_dropout, "lora_dropout", "lora_dropout=0.0")
        positive_number(self.learning_rate, "learning_rate", "learning_rate=1e-3")
        one_of(self.lr_scheduler, "lr_scheduler", SCHEDULERS)
        one_of(self.precision, "precision", PRECISIONS)
        flag(self.assistant_only, "assistant_only")
        for name in ("warmup_steps", "seed"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, Integral) or value < 0:
                raise WrongType(f"{name} must be an integer >= 0 (got {value!r}); try {name}=0.")
        if self.warmup_steps == 1:
            raise ValueError(
                "warmup_steps=1 would differ between the frameworks (Axolotl turns it into 2); "
                "use 0 or 2 or more."
            )
        if self.warmup_steps >= self.max_steps:
            raise ValueError(
                f"warmup_steps ({self.warmup_steps}) must be fewer than max_steps "
                f"({self.max_steps}); try warmup_steps=0."
            )


def _on_cpu(spec: RunSpec) -> bool:
    """Whether the run is a CPU run: the course trains in fp32 on a CPU only."""
    return spec.precision == "fp32"


def _data_path(spec: RunSpec) -> str:
    """The chat JSONL as an absolute path (LLaMA-Factory joins a relative one to dataset_dir)."""
    return os.path.abspath(spec.data)


def _target_list(spec: RunSpec) -> list[str]:
    """The target modules as a list of names, for a spec that does not say "all-linear"."""
    return [name.strip() for name in spec.target_modules.split(",") if name.strip()]


def trl_arguments(spec: RunSpec) -> tuple[dict[str, Any], dict[str, Any]]:
    """Return the (LoraConfig, SFTConfig) keyword arguments of the TRL script, as in lab 05."""
    all_linear = spec.target_modules == "all-linear"
    lora = {
        "r": spec.lora_r,
        "lora_alpha": spec.lora_alpha,
        "lora_dropout": spec.lora_dropout,
        "target_modules": "all-linear" if all_linear else _target_list(spec),
        "bias": "none",
        "task_type": "CAUSAL_LM",
    }
    sft = {
        "output_dir": spec.output_dir,
        "max_steps": spec.max_steps,
        "per_device_train_batch_size": spec.per_device_batch,
        "gradient_accumulation_steps": spec.gradient_accumulation,
        "learning_rate": spec.learning_rate,
        "lr_scheduler_type": spec.lr_scheduler,
        "warmup_steps": spec.warmup_steps,
        "optim": OPTIMIZER,
        "max_length": spec.max_length,
        "packing": False,
        # on for lab 05's prompt/completion data: labels on the answer only
        "completion_only_loss": spec.assistant_only,
        "logging_steps": spec.logging_steps,
        "save_strategy": "no",  # the script saves the adapter once, at the end
        "report_to": "none",
        "gradient_checkpointing": False,
        "bf16": spec.precision == "bf16",
        "fp16": spec.precision == "fp16",
        "use_cpu": _on_cpu(spec),
        "dataloader_pin_memory": not _on_cpu(spec),
        "seed": spec.seed,
    }
    return lora, sft


def axolotl_config(spec: RunSpec) -> dict[str, Any]:
    """Return the Axolotl 0.19 config of the run, ready for :func:`to_yaml`."""
    all_linear = spec.target_modules == "all-linear"
    roles = ["assistant"] if spec.assistant_only else ["system", "user", "assistant"]
    config: dict[str, Any] = {
        "base_model": spec.model,
        "datasets": [
            {
                "path": _data_path(spec),
                "ds_type": "json",
                "type": "chat_template",
                "field_messages": "messages",
                "chat_template": "tokenizer_default",
                "roles_to_train": roles,
                "train_on_eos": "turn",  # the answer's closing <|im_end|> is learned, as in TRL
            }
        ],
        "train_on_inputs": not spec.assistant_only,
        "val_set_size": 0,
        "sequence_len": spec.max_length,
        "excess_length_strategy": "truncate",
        "sample_packing": False,
        "adapter": "lora",
        "lora_r": spec.lora_r,
        "lora_alpha": spec.lora_alpha,
        "lora_dropout": spec.lora_dropout,
        "lora_target_linear": all_linear,
    }
    if not all_linear:
        config["lora_target_modules"] = _target_list(spec)
    config |= {
        "micro_batch_size": spec.per_device_batch,
        "gradient_accumulation_steps": spec.gradient_accumulation,
        "max_steps": spec.max_steps,
        "learning_rate": spec.learning_rate,
        "lr_scheduler": spec.lr_scheduler,
        "warmup_steps": spec.warmup_steps,
        "optimizer": OPTIMIZER,
        "gradient_checkpointing": False,
        "bf16": spec.precision == "bf16",
        "fp16": spec.precision == "fp16",
        "attn_implementation": ATTENTION,
        # Axolotl's fused LoRA kernels are Triton/CUDA code ("Torch not compiled with CUDA
        # enabled" on a CPU); left unset, Axolotl turns them on by itself.
        "lora_mlp_kernel": False,
        "lora_qkv_kernel": False,
        "lora_o_kernel": False,
        "lora_embedding_kernel": False,
        "dataloader_pin_memory": not _on_cpu(spec),
        "output_dir": spec.output_dir,
        "save_strategy": "no",  # Axolotl saves the adapter once training ends
        "logging_steps": spec.logging_steps,
        "seed": spec.seed,
    }
    return config


def llamafactory_config(
    spec: RunSpec, dataset_dir: str, dataset_name: str = "course_chats"
) -> dict[str, Any]:
    """Return the LLaMA-Factory 0.9.5 config of the run; `dataset_dir` holds its dataset_info.json."""
    if not isinstance(dataset_dir, str) or not dataset_dir:
        raise WrongType(f"dataset_dir must be a folder path as a string (got {dataset_dir!r}).")
    _check_dataset_name(dataset_name)
    all_linear = spec.target_modules == "all-linear"
    config: dict[str, Any] = {
        "model_name_or_path": spec.model,
        "stage": "sft",
        "do_train": True,
        "finetuning_type": "lora",
        "lora_rank": spec.lora_r,
        "lora_alpha": spec.lora_alpha,
        "lora_dropout": spec.lora_dropout,
        "lora_target": "all" if all_linear else ",".join(_target_list(spec)),
        "dataset": dataset_name,
        "dataset_dir": dataset_dir,
        "template": "smollm2",
        "cutoff_len": spec.max_length,
        "packing": False,
        "train_on_prompt": not spec.assistant_only,
        "per_device_train_batch_size": spec.per_device_batch,
        "gradient_accumulation_steps": spec.gradient_accumulation,
        "max_steps": spec.max_steps,
        "learning_rate": spec.learning_rate,
        "lr_scheduler_type": spec.lr_scheduler,
        "warmup_steps": spec.warmup_steps,
        "optim": OPTIMIZER,
        "disable_gradient_checkpointing": True,
        "flash_attn": ATTENTION,
        "bf16": spec.precision == "bf16",
        "fp16": spec.precision == "fp16",
    }
    if _on_cpu(spec):
        config["use_cpu"] = True
    config |= {
        "dataloader_pin_memory": not _on_cpu(spec),
        "output_dir": spec.output_dir,
        "overwrite_output_dir": True,
        "save_strategy": "no",  # LLaMA-Factory saves the adapter once training ends
        "logging_steps": spec.logging_steps,
        "report_to": "none",
        "seed": spec.seed,
    }
    return config


def llamafactory_dataset_info(spec: RunSpec, dataset_name: str = "course_chats") -> dict[str, Any]:
    """Return the dataset_info.json of LLaMA-Factory: one entry that reads the chat JSONL."""
    _check_dataset_name(dataset_name)
    entry = {
        "file_name": _data_path(spec),
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
    return {dataset_name: entry}


def _check_dataset_name(name: object) -> None:
    """Raise unless `name` is a usable LLaMA-Factory dataset name (no comma: it separates names)."""
    if not isinstance(name, str) or not name or "," in name:
        raise ValueError(f"dataset_name must be a name without commas (got {name!r}).")


def to_yaml(config: Mapping[str, Any]) -> str:
    """Write a config as YAML, keys in the order they were made."""
    return yaml.safe_dump(dict(config), sort_keys=False, allow_unicode=True)


# ---------------------------------------------------------------------------------------------
# The side-by-side table: each setting's name in the three frameworks, and how to read it back.
# ---------------------------------------------------------------------------------------------

Reader = str | Callable[[Mapping[str, Any]], Any]


class Field(NamedTuple):
    """One setting: what it means, its name in TRL, Axolotl and LLaMA-Factory, and its readers.

    `read` holds one reader per framework (TRL, Axolotl, LLaMA-Factory): a dotted key path into
    that framework's view (``"sft.max_steps"``, ``"datasets.0.path"``) or a function of the view
    that returns the value in the spec's terms. The TRL view is ``{"lora": ..., "sft": ...,
    "script": {"model", "data"}}``; LLaMA-Factory's is its config plus ``"dataset_info"``, the
    dataset's entry.
    """

    concept: str
    trl: str
    axolotl: str
    llamafactory: str
    read: tuple[Reader, Reader, Reader]


def _get(view: Mapping[str, Any], path: str) -> Any:
    """Read a dotted key path (list positions as numbers) from a nested config."""
    value: Any = view
    for part in path.split("."):
        value = value[int(part)] if isinstance(value, list) else value[part]
    return value


def _negated(path: str) -> Callable[[Mapping[str, Any]], bool]:
    """A reader of the opposite of a boolean key (train_on_prompt is "not assistant only")."""
    return lambda view: not _get(view, path)


def _precision(prefix: str = "") -> Callable[[Mapping[str, Any]], str]:
    """A reader of "bf16", "fp16" or "fp32" from the bf16 and fp16 flags."""

    def read(view: Mapping[str, Any]) -> str:
        if _get(view, prefix + "bf16"):
            return "bf16"
        return "fp16" if _get(view, prefix + "fp16") else "fp32"

    return read


def _trl_targets(view: Mapping[str, Any]) -> str:
    """TRL's target_modules in the spec's terms: "all-linear" or comma-separated names."""
    targets = view["lora"]["target_modules"]
    return targets if isinstance(targets, str) else ",".join(targets)


def _axolotl_targets(view: Mapping[str, Any]) -> str:
    """Axolotl's lora_target_linear / lora_target_modules in the spec's terms."""
    return "all-linear" if view["lora_target_linear"] else ",".join(view["lora_target_modules"])


def _llamafactory_targets(view: Mapping[str, Any]) -> str:
    """LLaMA-Factory's lora_target in the spec's terms ("all" is every linear layer)."""
    return "all-linear" if view["lora_target"] == "all" else view["lora_target"]


def _same(concept: str, trl: str, axolotl: str, llamafactory: str) -> Field:
    """A row whose value sits under one key in each framework (TRL's as Config.field)."""
    trl_path = trl.replace("LoraConfig.", "lora.").replace("SFTConfig.", "sft.")
    return Field(concept, trl, axolotl, llamafactory, (trl_path, axolotl, llamafactory))


#: Every setting of the run, in the order the lesson's table shows them.
FIELDS: tuple[Field, ...] = (
    Field(
        "base model (hub id or folder)",
        "from_pretrained(model)",
        "base_model",
        "model_name_or_path",
        ("script.model", "base_model", "model_name_or_path"),
    ),
    Field(
        "training data (chat JSONL)",
        "load_dataset('json', data_files=data)",
        "datasets[0].path",
        "dataset_info.json: file_name",
        ("script.data", "datasets.0.path", "dataset_info.file_name"),
    ),
    _same("LoRA rank r", "LoraConfig.r", "lora_r", "lora_rank"),
    _same("LoRA alpha (scale alpha/r)", "LoraConfig.lora_alpha", "lora_alpha", "lora_alpha"),
    _same(
        "dropout on the adapter's input", "LoraConfig.lora_dropout", "lora_dropout", "lora_dropout"
    ),
    Field(
        "layers that get an adapter",
        "LoraConfig.target_modules",
        "lora_target_linear",
        "lora_target",
        (_trl_targets, _axolotl_targets, _llamafactory_targets),
    ),
    _same("longest example, in tokens", "SFTConfig.max_length", "sequence_len", "cutoff_len"),
    _same(
        "examples per step and device",
        "SFTConfig.per_device_train_batch_size",
        "micro_batch_size",
        "per_device_train_batch_size",
    ),
    _same(
        "gradient accumulation",
        "SFTConfig.gradient_accumulation_steps",
        "gradient_accumulation_steps",
        "gradient_accumulation_steps",
    ),
    _same("optimizer steps", "SFTConfig.max_steps", "max_steps", "max_steps"),
    _same("learning rate", "SFTConfig.learning_rate", "learning_rate", "learning_rate"),
    _same(
        "learning-rate schedule", "SFTConfig.lr_scheduler_type", "lr_scheduler", "lr_scheduler_type"
    ),
    _same("warmup steps", "SFTConfig.warmup_steps", "warmup_steps", "warmup_steps"),
    _same("optimizer", "SFTConfig.optim", "optimizer", "optim"),
    _same("several examples packed in one row", "SFTConfig.packing", "sample_packing", "packing"),
    Field(
        "loss on the assistant's answer only",
        "SFTConfig.completion_only_loss",
        "train_on_inputs (negated)",
        "train_on_prompt (negated)",
        ("sft.completion_only_loss", _negated("train_on_inputs"), _negated("train_on_prompt")),
    ),
    Field(
        "gradient checkpointing",
        "SFTConfig.gradient_checkpointing",
        "gradient_checkpointing",
        "disable_gradient_checkpointing (negated)",
        (
            "sft.gradient_checkpointing",
            "gradient_checkpointing",
            _negated("disable_gradient_checkpointing"),
        ),
    ),
    Field(
        "precision",
        "SFTConfig.bf16 / fp16",
        "bf16 / fp16",
        "bf16 / fp16",
        (_precision("sft."), _precision(), _precision()),
    ),
    _same(
        "checkpoints during training", "SFTConfig.save_strategy", "save_strategy", "save_strategy"
    ),
    _same("output folder", "SFTConfig.output_dir", "output_dir", "output_dir"),
    _same(
        "log the loss every n steps", "SFTConfig.logging_steps", "logging_steps", "logging_steps"
    ),
    _same("random seed", "SFTConfig.seed", "seed", "seed"),
)

#: The frameworks of the side-by-side table, in its column order.
FRAMEWORKS = ("trl", "axolotl", "llamafactory")


def _views(spec: RunSpec) -> dict[str, Mapping[str, Any]]:
    """Each framework's generated config, as the FIELDS readers see it."""
    lora, sft = trl_arguments(spec)
    trl = {"lora": lora, "sft": sft, "script": {"model": spec.model, "data": _data_path(spec)}}
    name = "course_chats"
    llamafactory = llamafactory_config(spec, dataset_dir=os.path.dirname(_data_path(spec)))
    llamafactory["dataset_info"] = llamafactory_dataset_info(spec, name)[name]
    return {"trl": trl, "axolotl": axolotl_config(spec), "llamafactory": llamafactory}


def read_field(field: Field, framework: str, view: Mapping[str, Any]) -> Any:
    """Read one FIELDS row's value from one framework's view, in the spec's terms."""
    reader = field.read[FRAMEWORKS.index(one_of(framework, "framework", FRAMEWORKS))]
    return _get(view, reader) if isinstance(reader, str) else reader(view)


def side_by_side(spec: RunSpec) -> list[dict[str, Any]]:
    """Return, for each setting in FIELDS, its key and value in TRL, Axolotl and LLaMA-Factory."""
    views = _views(spec)
    rows = []
    for field in FIELDS:
        row: dict[str, Any] = {"concept": field.concept}
        for framework in FRAMEWORKS:
            row[f"{framework}_key"] = getattr(field, framework)
            row[framework] = read_field(field, framework, views[framework])
        rows.append(row)
    return rows


# ---------------------------------------------------------------------------------------------
# Checking a hand-edited config: unknown keys and values of the wrong kind.
# ---------------------------------------------------------------------------------------------

INT, NUMBER, BOOL, STR = "an integer", "a number", "true or false", "a string"
LIST, DICT, STR_OR_LIST = "a list", "a mapping", "a string or a list of strings"

#: LoraConfig keys: those trl_arguments writes, then ones a learner may add.
PEFT_KEYS: dict[str, str] = {
    "r": INT,
    "lora_alpha": INT,
    "lora_dropout": NUMBER,
    "target_modules": STR_OR_LIST,
    "bias": STR,
    "task_type": STR,
    "use_rslora": BOOL,
    "use_dora": BOOL,
    "modules_to_save": LIST,
    "layers_to_transform": LIST,
    "init_lora_weights": BOOL,
}

#: SFTConfig keys: those trl_arguments writes, then ones a learner may add.
TRL_KEYS: dict[str, str] = {
    "output_dir": STR,
    "max_steps": INT,
    "per_device_train_batch_size": INT,
    "gradient_accumulation_steps": INT,
    "learning_rate": NUMBER,
    "lr_scheduler_type": STR,
    "warmup_steps": INT,
    "optim": STR,
    "max_length": INT,
    "packing": BOOL,
    "completion_only_loss": BOOL,
    "logging_steps": INT,
    "save_strategy": STR,
    "report_to": STR_OR_LIST,
    "gradient_checkpointing": BOOL,
    "bf16": BOOL,
    "fp16": BOOL,
    "use_cpu": BOOL,
    "dataloader_pin_memory": BOOL,
    "seed": INT,
    "num_train_epochs": NUMBER,
    "weight_decay": NUMBER,
    "max_grad_norm": NUMBER,
    "save_steps": NUMBER,
    "save_total_limit": INT,
    "eval_strategy": STR,
    "eval_steps": NUMBER,
    "disable_tqdm": BOOL,
    "loss_type": STR,
    "assistant_only_loss": BOOL,
    "dataset_text_field": STR,
}

#: Axolotl top-level keys: those axolotl_config writes, then ones a learner may add.
AXOLOTL_KEYS: dict[str, str] = {
    "base_model": STR,
    "datasets": LIST,
    "train_on_inputs": BOOL,
    "val_set_size": NUMBER,
    "sequence_len": INT,
    "excess_length_strategy": STR,
    "sample_packing": BOOL,
    "adapter": STR,
    "lora_r": INT,
    "lora_alpha": INT,
    "lora_dropout": NUMBER,
    "lora_target_linear": BOOL,
    "lora_target_modules": STR_OR_LIST,
    "micro_batch_size": INT,
    "gradient_accumulation_steps": INT,
    "max_steps": INT,
    "learning_rate": NUMBER,
    "lr_scheduler": STR,
    "warmup_steps": INT,
    "optimizer": STR,
    "gradient_checkpointing": BOOL,
    "bf16": BOOL,
    "fp16": BOOL,
    "attn_implementation": STR,
    "lora_mlp_kernel": BOOL,
    "lora_qkv_kernel": BOOL,
    "lora_o_kernel": BOOL,
    "lora_embedding_kernel": BOOL,
    "dataloader_pin_memory": BOOL,
    "output_dir": STR,
    "save_strategy": STR,
    "logging_steps": INT,
    "seed": INT,
    # deprecated in 0.19 (dropped by normalize_attn_implementation), still accepted
    "flash_attention": BOOL,
    "sdp_attention": BOOL,
    "xformers_attention": BOOL,
    "tf32": BOOL,
    "chat_template": STR,
    "special_tokens": DICT,
    "dataset_prepared_path": STR,
    "num_epochs": NUMBER,
    "save_steps": NUMBER,
    "saves_per_epoch": INT,
    "save_total_limit": INT,
    "save_only_model": BOOL,
    "warmup_ratio": NUMBER,
    "weight_decay": NUMBER,
    "max_grad_norm": NUMBER,
    "load_in_8bit": BOOL,
    "load_in_4bit": BOOL,
    "peft_use_rslora": BOOL,
    "pad_to_sequence_len": BOOL,
    "dataloader_num_workers": INT,
    "strict": BOOL,
}

#: Keys of one entry of Axolotl's `datasets` list.
AXOLOTL_DATASET_KEYS: dict[str, str] = {
    "path": STR,
    "ds_type": STR,
    "type": STR,
    "field_messages": STR,
    "chat_template": STR,
    "roles_to_train": LIST,
    "train_on_eos": STR,
    "train_on_eot": STR,
    "split": STR,
    "data_files": STR_OR_LIST,
    "message_property_mappings": DICT,
    "roles": DICT,
    "drop_system_message": BOOL,
}

#: LLaMA-Factory keys: those llamafactory_config writes, then ones a learner may add.
LLAMAFACTORY_KEYS: dict[str, str] = {
    "model_name_or_path": STR,
    "stage": STR,
    "do_train": BOOL,
    "finetuning_type": STR,
    "lora_rank": INT,
    "lora_alpha": INT,
    "lora_dropout": NUMBER,
    "lora_target": STR,
    "dataset": STR,
    "dataset_dir": STR,
    "template": STR,
    "cutoff_len": INT,
    "packing": BOOL,
    "train_on_prompt": BOOL,
    "per_device_train_batch_size": INT,
    "gradient_accumulation_steps": INT,
    "max_steps": INT,
    "learning_rate": NUMBER,
    "lr_scheduler_type": STR,
    "warmup_steps": INT,
    "optim": STR,
    "disable_gradient_checkpointing": BOOL,
    "flash_attn": STR,
    "bf16": BOOL,
    "fp16": BOOL,
    "use_cpu": BOOL,
    "dataloader_pin_memory": BOOL,
    "output_dir": STR,
    "overwrite_output_dir": BOOL,
    "save_strategy": STR,
    "logging_steps": INT,
    "report_to": STR_OR_LIST,
    "seed": INT,
    "num_train_epochs": NUMBER,
    "max_samples": INT,
    "val_size": NUMBER,
    "eval_strategy": STR,
    "save_steps": NUMBER,
    "save_total_limit": INT,
    "save_only_model": BOOL,
    "plot_loss": BOOL,
    "weight_decay": NUMBER,
    "max_grad_norm": NUMBER,
    "use_rslora": BOOL,
    "use_dora": BOOL,
    "additional_target": STR,
    "mask_history": BOOL,
    "preprocessing_num_workers": INT,
    "dataloader_num_workers": INT,
    "overwrite_cache": BOOL,
    "trust_remote_code": BOOL,
    "resume_from_checkpoint": STR,
}

#: Keys of one dataset_info.json entry (a local file in the sharegpt format).
LLAMAFACTORY_DATASET_KEYS: dict[str, str] = {
    "file_name": STR,
    "formatting": STR,
    "columns": DICT,
    "tags": DICT,
    "split": STR,
    "num_samples": INT,
}

#: What check_config knows: a config's name, and its keys with the kind of value each takes.
CONFIG_KEYS: dict[str, dict[str, str]] = {
    "peft": PEFT_KEYS,
    "trl": TRL_KEYS,
    "axolotl": AXOLOTL_KEYS,
    "axolotl_dataset": AXOLOTL_DATASET_KEYS,
    "llamafactory": LLAMAFACTORY_KEYS,
    "llamafactory_dataset": LLAMAFACTORY_DATASET_KEYS,
}


class UnknownKey(KeyError):
    """A config key the framework does not take; its message is one sentence, unquoted."""

    def __str__(self) -> str:
        """The message itself (KeyError would show its repr)."""
        return str(self.args[0])


def _is_kind(value: object, kind: str) -> bool:
    """Whether `value` is of the kind a key takes (a YAML bool is not a number)."""
    number = isinstance(value, Real) and not isinstance(value, bool)
    return {
        INT: isinstance(value, Integral) and not isinstance(value, bool),
        NUMBER: number,
        BOOL: isinstance(value, bool),
        STR: isinstance(value, str),
        LIST: isinstance(value, list),
        DICT: isinstance(value, dict),
        STR_OR_LIST: isinstance(value, str)
        or (isinstance(value, list) and all(isinstance(v, str) for v in value)),
    }[kind]


def check_config(framework: str, config: Mapping[str, Any]) -> None:
    """Raise, in one sentence, on a key the framework does not take or a value of the wrong kind."""
    one_of(framework, "framework", CONFIG_KEYS)
    if not isinstance(config, Mapping):
        raise WrongType(
            f"a {framework} config must be a mapping of keys to values (got {config!r})."
        )
    known = CONFIG_KEYS[framework]
    for key, value in config.items():
        if key not in known:
            close = difflib.get_close_matches(str(key), known, n=1)
            hint = f"did you mean {close[0]!r}?" if close else "CONFIG_KEYS lists the known ones."
            raise UnknownKey(f"{framework} has no key {key!r}; {hint}")
        kind = known[key]
        if value is None or _is_kind(value, kind):
            continue
        hint = ""
        if kind == NUMBER and isinstance(value, str):
            hint = " (YAML reads 1e-3 as text: write 1.0e-3)"
        raise WrongType(f"{framework} key {key!r} takes {kind}, not {value!r}{hint}.")
    if framework == "axolotl":
        for dataset in config.get("datasets") or []:
            check_config("axolotl_dataset", dataset)
