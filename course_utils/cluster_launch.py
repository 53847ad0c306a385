"""A cluster launch generated from one description: accelerate/DeepSpeed configs, commands, SLURM.

Lesson 09 (scale-out), issue 28. One :class:`LaunchPlan` (N nodes × G GPUs, a script, a stage of
:data:`course_utils.sharding.STAGES`, mixed precision, offload) gives every text a learner
pastes: the YAML ``accelerate config`` would write, the ``accelerate launch`` and ``torchrun``
lines, a DeepSpeed config and an ``sbatch`` script that runs the launcher once per node.

Two rules shape the multi-node text. The per-node values (node rank, the first node's address)
come from SLURM when the job runs, so one file serves every node; and ``srun bash -c '...'``
keeps ``$SLURM_NODEID`` in single quotes so that each node expands its own, not the batch
shell's (which would give every node rank 0).
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass

import yaml

from .checks import WrongType, one_of, positive_int
from .sharding import OFFLOADS, STAGES, normalise_stage

__all__ = [
    "ENVIRONMENT",
    "LAUNCHERS",
    "MIXED_PRECISIONS",
    "QLORA_FSDP_CONSTRAINTS",
    "LaunchPlan",
    "accelerate_command",
    "accelerate_config",
    "deepspeed_config",
    "slurm_script",
    "torchrun_command",
    "variables_used",
]

MIXED_PRECISIONS = ("no", "bf16", "fp16")
LAUNCHERS = ("accelerate", "torchrun")
_ZERO = {"ddp": 0, "zero1": 1, "zero2": 2, "zero3": 3}  # the stages DeepSpeed itself has
_NAME = re.compile(r"[A-Za-z0-9._-]+")
_TIME = re.compile(r"(\d+):([0-5]\d):([0-5]\d)")


@dataclass(frozen=True)
class LaunchPlan:
    """One training run on ``nodes`` × ``gpus_per_node`` GPUs; everything else is derived from it."""

    nodes: int
    gpus_per_node: int
    script: str
    script_args: tuple[str, ...] = ()
    stage: str = "ddp"
    mixed_precision: str = "bf16"
    offload: str | None = None
    job_name: str = "finetune"
    main_port: int = 29500
    partition: str | None = None
    time: str = "04:00:00"
    cpus_per_task: int | None = None  # None: 8 per GPU

    def __post_init__(self) -> None:
        """Check every field and put the stage and the arguments in their one spelling."""
        positive_int(self.nodes, "nodes", "nodes=2")
        positive_int(self.gpus_per_node, "gpus_per_node", "gpus_per_node=8")
        if not isinstance(self.script, str) or not self.script.strip():
            raise WrongType(f"script must be a path such as 'train.py' (got {self.script!r}).")
        args = self.script_args
        if isinstance(args, str) or not all(isinstance(a, str) for a in args):
            raise WrongType(
                f"script_args must be a tuple of strings (got {args!r}); try ('--lr', '1e-4')."
            )
        stage = normalise_stage(self.stage)
        one_of(self.mixed_precision, "mixed_precision", MIXED_PRECISIONS)
        one_of(self.offload, "offload", OFFLOADS)
        _check_offload(stage, self.offload)
        _check_name(self.job_name, "job_name")
        if self.partition is not None:
            _check_name(self.partition, "partition")
        port = positive_int(self.main_port, "main_port", "main_port=29500")
        if not 1024 <= port <= 65535:
            raise ValueError(f"main_port must be between 1024 and 65535 (got {port}); try 29500.")
        match = _TIME.fullmatch(self.time) if isinstance(self.time, str) else None
        if not match or not any(int(part) for part in match.groups()):
            raise ValueError(f"time must be 'HH:MM:SS' such as '04:00:00' (got {self.time!r}).")
        cpus = 8 * self.gpus_per_node if self.cpus_per_task is None else self.cpus_per_task
        positive_int(cpus, "cpus_per_task", "cpus_per_task=64")
        object.__setattr__(self, "stage", stage)
        object.__setattr__(self, "script_args", tuple(args))
        object.__setattr__(self, "cpus_per_task", cpus)

    @property
    def processes(self) -> int:
        """All processes of the job: one per GPU, ``nodes × gpus_per_node``."""
        return self.nodes * self.gpus_per_node


def _check_name(value: object, name: str) -> None:
    """Raise unless ``value`` is a SLURM-safe name."""
    if not (isinstance(value, str) and _NAME.fullmatch(value)):
        raise ValueError(f"{name} must be letters, digits, '.', '_' or '-' (got {value!r}).")


def _check_offload(stage: str, offload: str | None) -> None:
    """Raise unless the stage can offload what is asked (the rules of sharding.per_device, and FSDP's)."""
    opt_shard, _, weight_shard = STAGES[stage]["shards"]
    if offload and not opt_shard:
        raise ValueError(
            "CPU offload needs a sharded stage (zero1, zero2, zero3 or fsdp_*), not 'ddp'."
        )
    if offload == "params" and not weight_shard:
        raise ValueError(f"offload='params' needs a stage that shards weights, not {stage!r}.")
    if offload == "optimizer" and stage.startswith("fsdp"):
        raise ValueError(
            "FSDP offloads the parameters with their gradients and optimizer step or nothing; "
            "use offload='params', or a zero* stage to offload the optimizer alone."
        )


def _plan(plan: object) -> LaunchPlan:
    """Return ``plan`` if it is a LaunchPlan, else raise saying how to make one."""
    if not isinstance(plan, LaunchPlan):
        raise WrongType(
            f"plan must be a LaunchPlan (got {type(plan).__name__}); try LaunchPlan(2, 8, 'train.py')."
        )
    return plan


def _config_dict(plan: LaunchPlan) -> dict:
    """The fields of accelerate's ClusterConfig for ``plan``, in the order ``accelerate config`` asks."""
    kind = "FSDP" if plan.stage.startswith("fsdp") else "DEEPSPEED"
    kind = "MULTI_GPU" if plan.stage == "ddp" else kind
    config: dict = {"compute_environment": "LOCAL_MACHINE", "distributed_type": kind}
    config |= {"num_machines": plan.nodes, "num_processes": plan.processes}
    if plan.nodes == 1:
        config["machine_rank"] = 0
    config |= {"main_process_port": plan.main_port, "rdzv_backend": "static"}
    config |= {"mixed_precision": plan.mixed_precision, "use_cpu": False}
    if kind == "DEEPSPEED":
        stage, offload = _ZERO[plan.stage], plan.offload
        config["deepspeed_config"] = {
            "zero_stage": stage,
            "offload_optimizer_device": "cpu" if offload else "none",
            "offload_param_device": "cpu" if offload == "params" else "none",
            "zero3_init_flag": stage == 3,  # build the model already sharded
            "zero3_save_16bit_model": stage == 3,  # gather whole weights when saving
        }
        if plan.nodes > 1:  # one launcher per node under srun, not DeepSpeed's ssh (pdsh)
            config["deepspeed_config"]["deepspeed_multinode_launcher"] = "standard"
    if kind == "FSDP":
        config["fsdp_config"] = {
            "fsdp_version": 2,
            "fsdp_reshard_after_forward": plan.stage != "fsdp_shard_grad_op",
            "fsdp_auto_wrap_policy": "TRANSFORMER_BASED_WRAP",  # one unit per decoder layer
            "fsdp_offload_params": plan.offload == "params",
            "fsdp_state_dict_type": "SHARDED_STATE_DICT",
            "fsdp_cpu_ram_efficient_loading": True,  # rank 0 reads the checkpoint
            "fsdp_activation_checkpointing": False,
        }
    if plan.stage == "fsdp_hybrid_shard":  # shard within a node, replicate across nodes
        config["parallelism_config"] = {
            "parallelism_config_dp_replicate_size": plan.nodes,
            "parallelism_config_dp_shard_size": plan.gpus_per_node,
        }
    return config


def accelerate_config(plan: LaunchPlan) -> str:
    """The YAML ``accelerate config`` would write for ``plan`` (save it, pass it as --config_file)."""
    plan = _plan(plan)
    head = [
        f"# accelerate config: {plan.nodes} node(s) x {plan.gpus_per_node} GPU(s), stage "
        f"{plan.stage} ({STAGES[plan.stage]['also']})"
    ]
    if plan.nodes > 1:
        head += [
            "# machine_rank and main_process_ip differ per node, so they are not in this file:",
            "# the launch command passes them from SLURM ($SLURM_NODEID, $MASTER_ADDR).",
        ]
    return "\n".join(head) + "\n" + yaml.safe_dump(_config_dict(plan), sort_keys=False)


def _tail(plan: LaunchPlan) -> str:
    """The script and its arguments, quoted for the shell."""
    return " ".join(shlex.quote(word) for word in (plan.script, *plan.script_args))


def accelerate_command(plan: LaunchPlan, config_file: str = "accelerate_config.yaml") -> str:
    """The ``accelerate launch`` line one node runs; on several nodes it reads SLURM's variables."""
    plan = _plan(plan)
    if not isinstance(config_file, str) or not config_file.strip():
        raise WrongType(
            f"config_file must be a path such as 'accelerate_config.yaml' (got {config_file!r})."
        )
    words = ["accelerate launch", f"--config_file {shlex.quote(config_file)}"]
    words += [f"--num_machines {plan.nodes}", f"--num_processes {plan.processes}"]
    if plan.nodes > 1:
        words += ["--machine_rank $SLURM_NODEID", "--main_process_ip $MASTER_ADDR"]
    return " ".join([*words, _tail(plan)])


def torchrun_command(plan: LaunchPlan) -> str:
    """The ``torchrun`` line one node runs: c10d rendezvous at the first node on several nodes.

    With ``--rdzv_backend c10d`` the nodes agree on their ranks at the rendezvous (torchrun warns
    that ``--node_rank`` is ignored there), so no per-node value is needed but the job id. The
    script itself sets up any sharding (e.g. ``TrainingArguments(deepspeed=deepspeed_config(plan))``).
    """
    plan = _plan(plan)
    if plan.nodes == 1:
        words = ["torchrun --standalone --nnodes 1", f"--nproc_per_node {plan.gpus_per_node}"]
    else:
        words = [f"torchrun --nnodes {plan.nodes}", f"--nproc_per_node {plan.gpus_per_node}"]
        words += ["--rdzv_id $SLURM_JOB_ID --rdzv_backend c10d"]
        words += [f"--rdzv_endpoint $MASTER_ADDR:{plan.main_port}"]
    return " ".join([*words, _tail(plan)])


def deepspeed_config(plan: LaunchPlan) -> dict:
    """A DeepSpeed config for ``plan``'s ZeRO stage; "auto" values are filled by HF Trainer/accelerate.

    Pass it as ``TrainingArguments(deepspeed=...)`` or save it with ``json.dump``. ``ddp`` is
    DeepSpeed's stage 0; the ``fsdp_*`` stages are not DeepSpeed's (see :func:`accelerate_config`).
    """
    plan = _plan(plan)
    if plan.stage not in _ZERO:
        same = "zero2" if plan.stage == "fsdp_shard_grad_op" else "zero3"
        raise ValueError(
            f"DeepSpeed has no stage {plan.stage!r}; use stage={same!r} (the same sharding) or "
            "accelerate_config(plan) for FSDP."
        )
    zero: dict = {"stage": _ZERO[plan.stage]}
    if plan.offload:  # ZeRO-Offload: optimizer states and the optimizer step on the CPU
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if plan.offload == "params":  # ZeRO-3 only
        zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    if zero["stage"] == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    return {
        "train_batch_size": "auto",
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto",
        "bf16": {"enabled": plan.mixed_precision == "bf16"},
        "fp16": {"enabled": plan.mixed_precision == "fp16"},
        "zero_optimization": zero,
    }


def slurm_script(
    plan: LaunchPlan, launcher: str = "accelerate", config_file: str = "accelerate_config.yaml"
) -> str:
    """An ``sbatch`` script: N nodes × G GPUs, one launcher per node started by ``srun``."""
    plan = _plan(plan)
    one_of(launcher, "launcher", LAUNCHERS)
    lines = [
        "#!/bin/bash",
        f"#SBATCH --job-name={plan.job_name}",
        f"#SBATCH --nodes={plan.nodes}",
        "#SBATCH --ntasks-per-node=1  # one launcher per node; it starts one process per GPU",
        f"#SBATCH --gpus-per-node={plan.gpus_per_node}",
        f"#SBATCH --cpus-per-task={plan.cpus_per_task}",
        f"#SBATCH --time={plan.time}",
    ]
    if plan.partition:
        lines.append(f"#SBATCH --partition={plan.partition}")
    lines += [
        "#SBATCH --output=%x-%j.out",
        "set -eu  # stop at the first error (no pipefail: head closes the pipe early)",
        "",
        "# The first node of the job hosts the rendezvous; srun passes these to every node.",
        'MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)',
        f"export MASTER_ADDR MASTER_PORT={plan.main_port}",
        f"export OMP_NUM_THREADS={max(1, plan.cpus_per_task // plan.gpus_per_node)}"
        "  # the node's CPUs shared by its GPU processes",
        "# export NCCL_DEBUG=INFO  # uncomment when nodes hang: NCCL says which network it uses",
        "# export NCCL_SOCKET_IFNAME=ib0  # uncomment to choose the network interface",
        "# SLURM sets CUDA_VISIBLE_DEVICES; the launcher sets RANK, LOCAL_RANK, WORLD_SIZE and",
        "# LOCAL_WORLD_SIZE for each process it starts.",
    ]
    if launcher == "accelerate":
        command = accelerate_command(plan, config_file)
        yaml_text = accelerate_config(plan).rstrip("\n")
        lines += ["", f"cat > {shlex.quote(config_file)} <<'EOF'", yaml_text, "EOF"]
    else:
        command = torchrun_command(plan)
    lines += [
        "",
        "# srun runs this once on each node; the single quotes let each node expand its own",
        "# $SLURM_NODEID (the batch shell runs on node 0 and would give every node rank 0).",
        f"srun bash -c {shlex.quote(command)}",
    ]
    return "\n".join(lines) + "\n"


#: What each environment variable of a multi-node launch does, one sentence each.
ENVIRONMENT: dict[str, str] = {
    "MASTER_ADDR": "Host name of the node that hosts the rendezvous; every process connects to it.",
    "MASTER_PORT": "TCP port of that rendezvous on MASTER_ADDR, the same on every node and free.",
    "WORLD_SIZE": "Number of processes in the whole job (nodes × GPUs per node), set by the launcher.",
    "RANK": "This process's index in the job, 0 to WORLD_SIZE - 1; rank 0 usually logs and saves.",
    "LOCAL_RANK": "This process's index on its node, which picks its GPU (cuda:LOCAL_RANK).",
    "NODE_RANK": "This node's index, 0 to nodes - 1: torchrun's --node_rank, accelerate's --machine_rank.",
    "LOCAL_WORLD_SIZE": "Number of processes on this node (its GPUs), set by torchrun.",
    "OMP_NUM_THREADS": "CPU threads each process may use; torchrun sets 1 when unset, so set it yourself.",
    "NCCL_DEBUG": "Set to INFO to make NCCL print the network and topology it chose.",
    "NCCL_SOCKET_IFNAME": "The network interface NCCL uses (ib0, eth0...) when it picks the wrong one.",
    "SLURM_JOB_NODELIST": "The job's nodes in SLURM's short form (node[01-04]); scontrol expands it.",
    "SLURM_NODEID": "This node's index in the job, 0 to SLURM_NNODES - 1, set by SLURM for each srun task.",
    "SLURM_NNODES": "Number of nodes in the job, as #SBATCH --nodes asked.",
    "SLURM_JOB_ID": "The job's number, unique on the cluster: a ready-made torchrun --rdzv_id.",
    "CUDA_VISIBLE_DEVICES": "The GPUs a process may see, renumbered from 0; SLURM sets it to the node's.",
}


def variables_used(text: str) -> dict[str, str]:
    """The ENVIRONMENT entries a script or command mentions, in ENVIRONMENT's order (for a table)."""
    if not isinstance(text, str):
        raise WrongType(
            f"text must be a string such as slurm_script(plan) (got {type(text).__name__})."
        )
    return {
        name: meaning
        for name, meaning in ENVIRONMENT.items()
        if re.search(rf"(?<![A-Z_]){name}(?![A-Z0-9_])", text)
    }


_PEFT_FSDP = "https://huggingface.co/docs/peft/accelerate/fsdp"
#: What QLoRA needs from FSDP, each with where it is documented.
QLORA_FSDP_CONSTRAINTS: tuple[tuple[str, str], ...] = (
    (
        "FSDP shards only floating-point tensors, so the 4-bit weights are packed into a float "
        "storage: set bnb_4bit_quant_storage to the dtype the model is loaded in (both "
        "torch.bfloat16, say).",
        "https://huggingface.co/docs/bitsandbytes/main/fsdp_qlora",
    ),
    (
        "With bf16 mixed precision the storage is bfloat16 (pure bf16) or float32 (autocast, more "
        "memory); with fp16 mixed precision it should be float32.",
        _PEFT_FSDP,
    ),
    (
        "FSDP1 needs use_orig_params=False to save memory, with PEFT's fsdp_auto_wrap_policy "
        "wrapping trainable and frozen parameters apart; FSDP2 has no such option (it always keeps "
        "the original parameters, as DTensors).",
        "https://huggingface.co/docs/accelerate/concept_guides/fsdp1_vs_fsdp2",
    ),
    (
        "PEFT's QLoRA + FSDP recipe sets fsdp_cpu_ram_efficient_loading and fsdp_offload_params "
        "(CPU offload of the 4-bit shards): 19.6 GB per GPU for Llama-2-70B on 2 GPUs, 35.6 GB "
        "without offload.",
        _PEFT_FSDP,
    ),
    (
        "Use FSDP's activation checkpointing rather than gradient_checkpointing (which adds an "
        "all-gather in the backward pass); Trainer refuses both at once.",
        "https://github.com/huggingface/transformers/issues/30404",
    ),
    (
        "Merging an adapter under FSDP is unsupported, and paged_adamw_8bit fails when saving a "
        "checkpoint with FSDP + QLoRA.",
        _PEFT_FSDP,
    ),
)
