"""Fine-tune a causal LM on several processes: data parallel (DDP) or sharded (FSDP2).

One process per GPU (or per CPU core), each with its own slice of every batch:

    torchrun --nproc_per_node 2 examples/distributed_finetune.py --model DIR --data chats.jsonl
    torchrun --nproc_per_node 2 examples/distributed_finetune.py ... --method full --fsdp

On GPUs `accelerate launch --num_processes 8 examples/distributed_finetune.py ...` does the same.
The loop is a plain Accelerate loop: what TRL's SFTTrainer does for you under the same launch.
"""

import argparse
import json
import os
import sys
import time
from contextlib import nullcontext
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))  # finetune.py, the one-process take-home script
from finetune import read_chats  # noqa: E402  (checks the JSONL, shuffles with --seed, holds out)


def parse_args() -> argparse.Namespace:
    """Read the command line; a value that cannot work stops here with a one-line error."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", required=True, help="hub id or local folder of a causal LM")
    p.add_argument("--data", required=True, type=Path, help='JSONL: {"messages": [...]} per line')
    p.add_argument("--method", choices=["lora", "full"], default="lora", help="(default lora)")
    p.add_argument("--fsdp", action="store_true", help="shard weights, gradients and optimizer")
    p.add_argument("--steps", type=int, default=4, help="optimizer steps (default 4)")
    p.add_argument("--batch-size", type=int, default=2, help="chats per process (default 2)")
    p.add_argument("--accumulation", type=int, default=1, help="micro-batches per step")
    p.add_argument("--learning-rate", type=float, default=1e-4, help="(default 1e-4)")
    p.add_argument("--seed", type=int, default=0, help="of the data order (default 0)")
    p.add_argument("--cpu", action="store_true", help="run on CPU cores even if there are GPUs")
    p.add_argument("--report", type=Path, help="write the run's measurements here (JSON)")
    p.add_argument("--output", help="save the LoRA adapter here (DDP runs only)")
    args = p.parse_args()
    for flag in ("steps", "batch_size", "accumulation", "learning_rate"):
        if (value := getattr(args, flag)) <= 0:
            sys.exit(
                f"distributed_finetune.py: --{flag.replace('_', '-')} must be > 0, not {value}"
            )
    if args.output and args.fsdp:
        sys.exit("distributed_finetune.py: --output saves DDP runs only; drop --fsdp or --output")
    args.eval_fraction = 0.1  # read_chats holds out a tenth, as finetune.py does
    return args


def tokenize(tokenizer, chat: dict) -> dict:
    """Token ids of one prompt/completion chat, with labels on the completion only."""
    prompt = tokenizer.apply_chat_template(chat["prompt"], add_generation_prompt=True)
    whole = tokenizer.apply_chat_template(chat["prompt"] + chat["completion"])
    prompt, whole = (
        list(getattr(prompt, "input_ids", prompt)),
        list(getattr(whole, "input_ids", whole)),
    )
    return {"input_ids": whole, "labels": [-100] * len(prompt) + whole[len(prompt) :]}


def collate(rows: list[dict], pad_id: int) -> dict:
    """Pad a micro-batch on the right; padding is masked out and carries no label."""
    import torch

    width = max(len(row["input_ids"]) for row in rows)
    batch = {"input_ids": [], "attention_mask": [], "labels": []}
    for row in rows:
        pad = width - len(row["input_ids"])
        batch["input_ids"].append(row["input_ids"] + [pad_id] * pad)
        batch["attention_mask"].append([1] * len(row["input_ids"]) + [0] * pad)
        batch["labels"].append(row["labels"] + [-100] * pad)
    return {key: torch.tensor(value) for key, value in batch.items()}


def load_model(args: argparse.Namespace, dtype):
    """Return (model, tokenizer): LoRA on every linear layer, or every weight trainable."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype)
    if args.method == "lora":
        model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"))
    return model, tokenizer


def shard(model):
    """FSDP2: each decoder layer, then the rest, split into one shard per process."""
    from torch.distributed.fsdp import fully_shard

    for module in model.modules():
        if type(module).__name__.endswith("DecoderLayer"):
            fully_shard(module)
    return fully_shard(model)


def local_bytes(tensors) -> int:
    """Bytes this process holds of some tensors (its shard of a sharded one)."""
    total = 0
    for t in tensors:
        t = t.to_local() if hasattr(t, "to_local") else t
        total += t.numel() * t.element_size()
    return total


def model_state_bytes(model, optimizer) -> dict:
    """This process's bytes of weights, gradients and optimizer states, after a step."""
    params = list(model.parameters())
    states = [v for s in optimizer.state.values() for v in s.values() if hasattr(v, "numel")]
    grads = [p.grad for p in params if p.grad is not None]
    return {
        "weights": local_bytes(params),
        "gradients": local_bytes(grads),
        "optimizer": local_bytes(states),
    }


def peak_meter(device):
    """A context that records peak tensor bytes: CUDA's counter, or the course's CPU one."""
    import torch

    if device.type == "cuda":  # counted from here, as the CPU counter does
        torch.cuda.reset_peak_memory_stats(device)
        start = torch.cuda.memory_allocated(device)
        return nullcontext(), lambda: torch.cuda.max_memory_allocated(device) - start
    try:  # the course's counter (torch.profiler's allocations); absent outside the course
        from course_utils.peak_memory import PeakMemory
    except ImportError:
        return nullcontext(), lambda: None
    meter = PeakMemory("cpu")
    return meter, lambda: meter.peak


def allreduce_ms(numel: int, device, repeats: int = 5) -> float:
    """Milliseconds one all-reduce of a gradient-sized fp32 buffer takes (what DDP sends)."""
    import torch
    import torch.distributed as dist

    buffer = torch.ones(numel, device=device)
    dist.all_reduce(buffer)  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        dist.all_reduce(buffer)
    return (time.perf_counter() - start) / repeats * 1000


def main() -> None:
    """Train --steps steps on every process, print the loss, write the measurements."""
    args = parse_args()
    train, _ = read_chats(args)
    import torch
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, gather_object, set_seed

    # gloo on a CPU, NCCL on GPUs; DDP's gradients live in its all-reduce buckets (no copy)
    ddp = DistributedDataParallelKwargs(gradient_as_bucket_view=True)
    accelerator = Accelerator(cpu=args.cpu or not torch.cuda.is_available(), kwargs_handlers=[ddp])
    world, rank = accelerator.num_processes, accelerator.process_index
    per_step = args.batch_size * args.accumulation * world  # the effective batch
    if len(train) < args.steps * per_step:
        sys.exit(f"distributed_finetune.py: {args.steps} steps of {per_step} need more chats")
    dtype = torch.bfloat16 if accelerator.device.type == "cuda" else torch.float32
    set_seed(args.seed)  # the same LoRA initialisation in every run (DDP copies rank 0's anyway)
    model, tokenizer = load_model(args, dtype)
    model.train()
    rows = [tokenize(tokenizer, chat) for chat in train[: args.steps * per_step]]
    loader = torch.utils.data.DataLoader(  # in file order: process r gets batches r, r+world, ...
        rows, batch_size=args.batch_size, collate_fn=lambda b: collate(b, tokenizer.pad_token_id)
    )
    if args.fsdp:
        model = shard(model)
        loader = accelerator.prepare(loader)
    else:
        model.to(accelerator.device)
        model, loader = accelerator.prepare(model, loader)  # DDP: gradients all-reduced
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=args.learning_rate, fused=True)  # as Trainer
    entry = local_bytes(model.parameters())

    log = {"world_size": world, "per_process_batch": args.batch_size, "effective_batch": per_step}
    log.update(method=args.method, fsdp=args.fsdp, accumulation=args.accumulation)
    log.update(losses=[], grad_norms=[], seconds=[], tokens=[], widest=0)
    meter, peak = peak_meter(accelerator.device)
    batches = iter(loader)
    with meter:
        for step in range(args.steps):
            start = time.perf_counter()
            micro = [next(batches) for _ in range(args.accumulation)]
            # the loss is a mean over every answer token of the step, on all processes together
            mine = sum(int((b["labels"][:, 1:] != -100).sum()) for b in micro)
            tokens = int(accelerator.reduce(torch.tensor(mine, device=accelerator.device), "sum"))
            total = 0.0
            for i, batch in enumerate(micro):
                sync = i == len(micro) - 1  # all-reduce the gradients once, after the last one
                if args.fsdp:
                    model.set_requires_gradient_sync(sync)
                with nullcontext() if sync or args.fsdp else accelerator.no_sync(model):
                    loss = model(**batch, num_items_in_batch=tokens).loss  # sum of losses / tokens
                    accelerator.backward(loss * world)  # DDP and FSDP average the gradients
                total += float(accelerator.reduce(loss.detach(), "sum"))
                log["widest"] = max(log["widest"], batch["input_ids"].shape[1])
            norm = torch.nn.utils.clip_grad_norm_(trainable, max_norm=1.0)  # as Trainer does
            norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # FSDP: a DTensor
            optimizer.step()
            if step == args.steps - 1:  # the last step's, before the gradients are let go
                states = model_state_bytes(model, optimizer)
            optimizer.zero_grad()
            log["losses"].append(total)
            log["tokens"].append(tokens)
            log["grad_norms"].append(float(norm))
            log["seconds"].append(time.perf_counter() - start)
            accelerator.print(
                f"step {step + 1}/{args.steps}  loss {total:.4f}  {log['seconds'][-1]:.1f} s"
            )

    mine = {"rank": rank, "entry": entry, "peak": peak(), **states}
    log["trainable_params"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
    log["allreduce_ms"] = (
        allreduce_ms(log["trainable_params"], accelerator.device) if world > 1 else 0.0
    )
    log["ranks"] = gather_object([mine])
    if args.output and accelerator.is_main_process:
        accelerator.unwrap_model(model).save_pretrained(args.output)
    if args.report and accelerator.is_main_process:
        args.report.write_text(json.dumps(log, indent=1))
    accelerator.print(
        f"{world} process(es) x batch {args.batch_size} x {args.accumulation}: {per_step} chats a step"
    )
    accelerator.end_training()


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
