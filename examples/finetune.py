"""Fine-tune a causal LM on your own chats with LoRA or QLoRA (PEFT + TRL), then evaluate it.

python examples/finetune.py --model HuggingFaceTB/SmolLM2-135M-Instruct --data chats.jsonl
"""

import argparse
import importlib.util
import json
import random
import sys
from pathlib import Path


def parse_args() -> argparse.Namespace:
    """Read the command line; a value that cannot work stops here with a one-line error."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", required=True, help="hub id or local folder of a causal LM")
    p.add_argument("--data", required=True, type=Path, help='JSONL: {"messages": [...]} per line')
    p.add_argument("--method", choices=["lora", "qlora"], default="lora", help="qlora: NF4 base")
    p.add_argument("--rank", type=int, default=16, help="LoRA rank r (default 16)")
    p.add_argument("--alpha", type=float, default=32, help="LoRA scale is alpha/r (default 32)")
    p.add_argument("--steps", type=int, default=60, help="optimizer steps (default 60)")
    p.add_argument("--learning-rate", type=float, default=1e-3, help="(default 1e-3)")
    p.add_argument("--batch-size", type=int, default=8, help="chats per step (default 8)")
    p.add_argument("--eval-fraction", type=float, default=0.1, help="share held out (default 0.1)")
    p.add_argument("--seed", type=int, default=0, help="of the split and the training (default 0)")
    p.add_argument("--output", default="finetuned-adapter", help="where the adapter is saved")
    args = p.parse_args()
    for flag in ("rank", "alpha", "steps", "learning_rate", "batch_size"):
        if (value := getattr(args, flag)) <= 0:
            sys.exit(f"finetune.py: --{flag.replace('_', '-')} must be > 0, not {value}")
    if args.method == "qlora" and importlib.util.find_spec("bitsandbytes") is None:
        sys.exit("finetune.py: --method qlora needs bitsandbytes (pip install bitsandbytes)")
    return args


def read_chats(args: argparse.Namespace) -> tuple[list[dict], list[dict]]:
    """Return (train, held-out) prompt/completion pairs from --data; exit on its first bad line."""
    if not args.data.is_file():
        sys.exit(f"finetune.py: {args.data}: no such file")
    pairs = []  # prompt/completion: the loss is on the final assistant message only
    for number, line in enumerate(args.data.read_text(encoding="utf-8").splitlines(), start=1):
        try:
            messages = json.loads(line)["messages"]
            ok = all(isinstance(m["role"], str) and isinstance(m["content"], str) for m in messages)
        except json.JSONDecodeError as error:
            sys.exit(f"finetune.py: {args.data}:{number}: not JSON ({error.msg})")
        except (KeyError, TypeError):
            ok = False
        if not ok or len(messages) < 2 or messages[-1]["role"] != "assistant":
            sys.exit(f'finetune.py: {args.data}:{number}: no "messages" ending with the assistant')
        pairs.append({"prompt": messages[:-1], "completion": messages[-1:]})
    random.Random(args.seed).shuffle(pairs)
    n = round(len(pairs) * args.eval_fraction)
    if not 0 < n < len(pairs):
        sys.exit(f"finetune.py: holding out {args.eval_fraction} of {len(pairs)} chats leaves none")
    return pairs[n:], pairs[:n]


def load_model(args: argparse.Namespace, dtype):
    """Return (model with LoRA on every linear layer, tokenizer); the base is NF4 for QLoRA."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    try:  # a wrong --model fails here
        tokenizer = AutoTokenizer.from_pretrained(args.model)
    except (OSError, ValueError) as error:
        sys.exit(f"finetune.py: cannot load --model {args.model}: {str(error).splitlines()[0]}")
    nf4 = None
    if args.method == "qlora":  # 4-bit NormalFloat weights, their scales quantized too
        nf4 = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype,
        )
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype, quantization_config=nf4)
    if nf4:  # norms in fp32, gradient checkpointing, inputs that carry gradients
        model = prepare_model_for_kbit_training(model)
        for module in model.modules():  # no CPU inference repacking: it would break training
            module.support_avx512bf16_for_cpu = False
    lora = LoraConfig(r=args.rank, lora_alpha=args.alpha, target_modules="all-linear")
    return get_peft_model(model, lora), tokenizer


def main() -> None:
    """Check the inputs, train with TRL's SFTTrainer, print before/after on held-out data, save."""
    args = parse_args()
    train, held_out = read_chats(args)  # the data is checked before the slow imports below
    import torch
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    half = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16  # fp16 on a T4
    dtype = half if torch.cuda.is_available() else torch.float32  # bf16 is slow on a CPU
    model, tokenizer = load_model(args, dtype)
    config = SFTConfig(
        output_dir=args.output,
        max_steps=args.steps,
        learning_rate=args.learning_rate,
        per_device_train_batch_size=args.batch_size,
        bf16=dtype == torch.bfloat16,  # TRL's default is bf16=True, whatever the device
        fp16=dtype == torch.float16,
        gradient_checkpointing=args.method == "qlora",  # TRL's default is True
        save_strategy="no",
        seed=args.seed,
    )
    data = {"train_dataset": Dataset.from_list(train), "eval_dataset": Dataset.from_list(held_out)}
    trainer = SFTTrainer(model=model, args=config, processing_class=tokenizer, **data)
    before = trainer.evaluate()  # on the held-out answers only, teacher-forced
    trainer.train()
    for when, s in (("before", before), ("after", trainer.evaluate())):
        loss, accuracy = s["eval_loss"], s["eval_mean_token_accuracy"]
        print(f"{when:<6} training: held-out loss {loss:.4f}, token accuracy {accuracy:.1%}")
    trainer.save_model(args.output)
    print(f"{args.method} adapter, trained on {len(train)} chats, saved to {args.output}/")


if __name__ == "__main__":
    main()
