"""The course's own training path: full fine-tuning, LoRA and QLoRA through TRL's SFTTrainer.

The labs do NOT use this module: they write ``LoraConfig``, ``get_peft_model``, ``SFTConfig``
and ``SFTTrainer`` themselves (lab 05). `make bench` and the tests use it to run every method the
same way in one call, and to race TRL's stock loss against the course's kernels:

- the data is the course's chat examples, tokenized by `course_utils.data` (assistant-only
  labels: -100 on every prompt token), handed to TRL's ``SFTTrainer`` already tokenized;
- the model is prepared by `prepare_model`: all weights trainable (``"full"``), PEFT LoRA on a
  frozen base (``"lora"``), or PEFT LoRA on the 4-bit NF4 base after
  ``prepare_model_for_kbit_training`` (``"qlora"``);
- the loss is TRL's default (``"chunked_nll"``) unless asked for the course's
  `course_utils.fused_loss` (``loss_type="fused"``), and the MLP is the model's own unless asked
  for `course_utils.swiglu` (``fused_mlp=True``): lab 10's "going further" section;
- the precision follows `course_utils.env`: fp32 on a CPU, bf16 (fp16 on a T4) on a GPU;
- what the run measured comes from `course_utils.callbacks.TrainingMeter` (a `TrainResult`).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from typing import Any

import torch
from datasets import Dataset
from peft import LoraConfig, PeftModel, get_peft_model, prepare_model_for_kbit_training
from transformers import TrainerCallback
from transformers.trainer_callback import PrinterCallback
from trl import SFTConfig, SFTTrainer

from course_utils import data, env, fused_loss, methods, swiglu
from course_utils.assets import has_cpu_inference_layout, keep_trainable_4bit_layout
from course_utils.callbacks import TrainingMeter, TrainResult, count_parameters, plot_losses
from course_utils.checks import one_of, positive_int, positive_number
from course_utils.memory import METHODS

__all__ = [
    "METHODS",
    "TrainResult",
    "chat_dataset",
    "count_parameters",
    "lora_config",
    "plot_losses",
    "prepare_model",
    "train",
]

#: The fine-tuning methods `prepare_model` and `train` know.
#: The losses `train` knows: TRL's own two, "chunked_nll" (TRL's default and ours: the logits
#: 256 labelled tokens at a time, recomputed in backward) and "nll" (full logits), and the
#: course's "fused" (`course_utils.fused_loss`: chunks whose gradient is formed in one pass).
LOSS_TYPES = ("chunked_nll", "nll", "fused")
MB = 2**20
#: Gradient checkpointing as torch 2.x does it by default (the layer's forward run again in the
#: backward pass, "reentrant"), said explicitly: left out, as PEFT's
#: prepare_model_for_kbit_training leaves it, torch warns under every QLoRA training cell.
CHECKPOINTING = {"use_reentrant": True}


# --------------------------------------------------------------------------------------------
# 1. The model: which weights train.
# --------------------------------------------------------------------------------------------


def lora_config(
    r: int = 16,
    alpha: float | None = None,
    dropout: float = 0.0,
    target_modules: str | Sequence[str] = "all-linear",
    use_rslora: bool = False,
):
    """Return a PEFT ``LoraConfig`` for a causal LM (alpha defaults to 2·r, the common choice)."""
    r = positive_int(r, "r (the LoRA rank)", "r=16")
    alpha = 2 * r if alpha is None else positive_number(alpha, "alpha", "alpha=2*r")
    if isinstance(dropout, bool) or not isinstance(dropout, int | float) or not 0 <= dropout < 1:
        raise ValueError(f"dropout must be in [0, 1) (got {dropout!r}); try dropout=0.0.")
    if isinstance(target_modules, str):
        targets: str | list[str] = target_modules
    elif isinstance(target_modules, Sequence) and target_modules:
        targets = list(target_modules)
        if not all(isinstance(t, str) and t for t in targets):
            raise ValueError("target_modules must be layer names such as ['q_proj', 'v_proj'].")
    else:
        raise ValueError(
            "target_modules must be 'all-linear' or a list of layer names like ['q_proj', 'v_proj']."
        )
    return LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=float(dropout),
        target_modules=targets,
        use_rslora=bool(use_rslora),
        bias="none",
        task_type="CAUSAL_LM",
    )


def is_4bit(model) -> bool:
    """Say whether the model's linear weights are stored in 4 bits by bitsandbytes."""
    return bool(getattr(model, "is_loaded_in_4bit", False)) or any(
        type(p).__name__ == "Params4bit" for p in model.parameters()
    )


def prepare_model(model, method: str, lora=None, gradient_checkpointing: bool | None = None):
    """Make the right weights trainable for `method` and return the model to train.

    ``"full"``: every parameter trains. ``"lora"``: PEFT LoRA (`lora`, default `lora_config()`)
    on a frozen base. ``"qlora"``: the base must be loaded in 4 bits
    (``assets.load_model(quantization="nf4")``); ``prepare_model_for_kbit_training`` keeps the
    norms in fp32 and turns on gradient checkpointing, then LoRA goes on top.
    """
    method = one_of(method, "method", METHODS)
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a transformers model (got {type(model).__name__}).")
    if isinstance(model, PeftModel):
        raise ValueError(
            "This model already has adapters; load a fresh base model with assets.load_model()."
        )
    quantized = is_4bit(model)
    if method == "qlora" and not quantized:
        raise ValueError(
            "QLoRA needs the 4-bit base model; load it with "
            "assets.load_model(quantization='nf4') (bitsandbytes must be installed)."
        )
    if quantized:
        if has_cpu_inference_layout(model):
            raise ValueError(
                "bitsandbytes repacked this 4-bit model's weights for CPU inference, a layout "
                "training gets wrong; load it again with assets.load_model(quantization='nf4')."
            )
        keep_trainable_4bit_layout(model)
    if method != "qlora" and quantized:
        raise ValueError(
            f"A 4-bit model cannot be trained with method={method!r}; use method='qlora' "
            "or load the model without quantization."
        )
    if gradient_checkpointing is None:
        gradient_checkpointing = method == "qlora"
    if method == "full":
        for param in model.parameters():
            param.requires_grad_(True)
        if gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=CHECKPOINTING)
        model.train()
        return model
    if method == "qlora":
        model = prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=gradient_checkpointing,
            gradient_checkpointing_kwargs=CHECKPOINTING,
        )
    elif gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=CHECKPOINTING)
        model.enable_input_require_grads()
    peft_model = get_peft_model(model, lora if lora is not None else lora_config())
    peft_model.train()
    return peft_model


# --------------------------------------------------------------------------------------------
# 2. The data: chat examples -> a tokenized datasets.Dataset with assistant-only labels.
# --------------------------------------------------------------------------------------------


def chat_dataset(tokenizer, examples: Sequence[data.Example], max_length: int | None = 512):
    """Tokenize chat examples into a ``datasets.Dataset`` (input_ids, attention_mask, labels)."""
    if isinstance(examples, dict) or not isinstance(examples, Sequence) or not examples:
        raise ValueError(
            "examples must be a non-empty list of chat examples, e.g. "
            "data.load_instruction_task('train')."
        )
    rows = [
        data.tokenize_with_assistant_mask(tokenizer, example, max_length=max_length)
        for example in examples
    ]
    return Dataset.from_list(rows)


# --------------------------------------------------------------------------------------------
# 3. Training.
# --------------------------------------------------------------------------------------------


def on_cuda(model) -> bool:
    """Say whether the model's weights are on a CUDA device."""
    return next(model.parameters()).device.type == "cuda"


def precision_flags(model) -> dict[str, bool]:
    """bf16/fp16 mixed precision on CUDA as env.default_dtype says; nothing on a CPU."""
    if not on_cuda(model):
        return {"bf16": False, "fp16": False}
    dtype = env.default_dtype("cuda")
    return {"bf16": dtype == torch.bfloat16, "fp16": dtype == torch.float16}


def train(
    model,
    tokenizer,
    examples: Sequence[data.Example] | Any,
    *,
    method: str,
    steps: int,
    batch_size: int = 8,
    learning_rate: float = 1e-3,
    warmup_steps: int = 0,
    seed: int = 0,
    max_length: int | None = 512,
    live_plot: bool = True,
    measure_memory: bool = False,
    progress_bar: bool = True,
    output_dir: str | os.PathLike | None = None,
    loss_type: str = "chunked_nll",
    fused_mlp: bool = False,
    optimizer: torch.optim.Optimizer | None = None,
    callbacks: Sequence[Any] = (),
) -> TrainResult:
    """Train a prepared model (`prepare_model`) for `steps` optimizer steps with TRL's SFTTrainer.

    `examples` is a list of chat examples (tokenized here with assistant-only labels) or a
    ``datasets.Dataset`` with ``input_ids`` and ``labels`` (e.g. blocks of text for causal LM).
    Returns a `TrainResult`; the model is trained in place. `loss_type` is one of LOSS_TYPES:
    TRL's ``"chunked_nll"`` (its default), ``"nll"``, the plain cross-entropy over all logits
    (which Unsloth's CPU backend replaces with its own chunked one, lab 10), or the course's
    ``"fused"`` (`course_utils.fused_loss`). `fused_mlp=True` computes each MLP's
    SiLU(gate) * up with `course_utils.swiglu` (the same numbers, a quarter to a third fewer
    activations kept); False (the default) leaves the model's own MLP forward.
    `optimizer` replaces the trainer's AdamW (the linear schedule still drives its learning
    rates) and `callbacks` are extra ``TrainerCallback`` objects, e.g. a per-step hook (lab 12).
    """
    method = one_of(method, "method", METHODS)
    steps = positive_int(steps, "steps", "steps=60")
    batch_size = positive_int(batch_size, "batch_size", "batch_size=8")
    learning_rate = positive_number(learning_rate, "learning_rate", "learning_rate=1e-3")
    if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < 0:
        raise ValueError(f"warmup_steps must be an integer >= 0 (got {warmup_steps!r}).")
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES} (got {loss_type!r}).")
    if not isinstance(fused_mlp, bool):
        raise TypeError(f"fused_mlp must be True or False (got {fused_mlp!r}).")
    callbacks = _check_extras(optimizer, callbacks)
    trainable, total = count_parameters(model)
    if trainable == 0:
        raise ValueError(
            "The model has no trainable parameters; call train.prepare_model(model, method) first."
        )
    dataset = (
        examples if isinstance(examples, Dataset) else chat_dataset(tokenizer, examples, max_length)
    )
    if "input_ids" not in dataset.column_names or "labels" not in dataset.column_names:
        raise ValueError(
            "The dataset needs 'input_ids' and 'labels' columns; build it with chat_dataset."
        )
    env.seed_everything(seed)
    meter = TrainingMeter(method, live_plot=live_plot, measure_memory=measure_memory)
    with tempfile.TemporaryDirectory() as scratch:
        config = SFTConfig(
            output_dir=str(output_dir or scratch),
            max_steps=steps,
            per_device_train_batch_size=batch_size,
            learning_rate=learning_rate,
            lr_scheduler_type="linear",
            warmup_steps=warmup_steps,
            weight_decay=0.0,
            logging_steps=1,
            save_strategy="no",
            report_to="none",
            seed=seed,
            data_seed=seed,
            max_length=max_length,
            dataloader_num_workers=0,
            dataloader_pin_memory=on_cuda(model),
            disable_tqdm=not progress_bar,
            gradient_checkpointing=False,  # prepare_model decided already
            include_num_input_tokens_seen="non_padding",
            # TRL's chunked_nll contract (a forward returning the loss and token counts) is
            # what the fused head keeps; its forward replaces TRL's once the trainer exists.
            loss_type="chunked_nll" if loss_type == "fused" else loss_type,
            **precision_flags(model),
        )
        trainer = SFTTrainer(
            model=model,
            args=config,
            train_dataset=dataset,
            processing_class=tokenizer,
            callbacks=[meter, *callbacks],
            **({} if optimizer is None else {"optimizers": (optimizer, None)}),
        )
        trainer.remove_callback(_printer_callback())
        _use_loss(model, loss_type)
        _use_mlp(model, fused_mlp)
        trainer.train()
    model.eval()
    return meter.result


def _use_loss(model, loss_type: str) -> None:
    """Put the fused LM-head loss on the causal LM inside `model`, or take it off."""
    causal_lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    if loss_type == "fused":
        fused_loss.patch_lm_head(causal_lm)
    elif loss_type == "nll":
        fused_loss.unpatch_lm_head(causal_lm)  # chunked_nll: TRL put its own forward on


def _use_mlp(model, fused: bool) -> None:
    """Put `course_utils.swiglu` on the model's MLPs (where it has Llama-style ones), or take it off."""
    if fused:
        swiglu.patch_mlp(model, missing_ok=True)
    else:
        swiglu.unpatch_mlp(model)


def _check_extras(optimizer: object, callbacks: object) -> list:
    """Return `callbacks` as a list if it holds TrainerCallbacks and `optimizer` is one, else raise."""
    if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(
            f"optimizer must be a torch.optim.Optimizer or None (got {type(optimizer).__name__}); "
            "build it for this model, e.g. methods.make_optimizer('lora+', model)."
        )
    if isinstance(callbacks, TrainerCallback) or not isinstance(callbacks, Sequence):
        raise TypeError("callbacks must be a list of TrainerCallback objects, e.g. [MyCallback()].")
    if not all(isinstance(c, TrainerCallback) for c in callbacks):
        raise TypeError("every entry of callbacks must be a transformers TrainerCallback instance.")
    return list(callbacks)


def _printer_callback():
    """The callback class that prints every log dict (noise next to the progress bar)."""
    return PrinterCallback


def train_method(
    model,
    tokenizer,
    examples,
    *,
    method: str,
    steps: int,
    learning_rate: float = 1e-3,
    loraplus_lr_ratio: float = methods.LORAPLUS_LR_RATIO,
    **train_kwargs: Any,
) -> TrainResult:
    """Train a model from `apply_method` through `train` with the method's optimizer and hooks."""
    method = one_of(method, "method", methods.METHODS)
    optimizer = methods.make_optimizer(
        method, model, learning_rate=learning_rate, loraplus_lr_ratio=loraplus_lr_ratio
    )
    result = train(
        model,
        tokenizer,
        examples,
        method="lora",  # train's family: a frozen base with adapters
        steps=steps,
        learning_rate=learning_rate,
        optimizer=optimizer,
        callbacks=methods.make_callbacks(method, model),
        **train_kwargs,
    )
    result.label = method
    return result
