"""Tests for course_utils.cluster_launch: every text it writes is read back by the tool that uses it.

The YAML by accelerate's own loader, the commands by accelerate's and torchrun's own parsers, the
DeepSpeed dict by accelerate's DeepSpeedPlugin and the SLURM script by bash, run under a fake
``srun``/``scontrol`` that starts it on two "nodes".
"""

import os
import shlex
import stat
import subprocess

import pytest
from accelerate import DeepSpeedPlugin
from accelerate.commands.config.config_args import load_config_from_file
from accelerate.commands.launch import _validate_launch_command, launch_command_parser
from accelerate.utils.launch import prepare_deepspeed_cmd_env, prepare_multi_gpu_env
from torch.distributed.run import get_args_parser

from course_utils import sharding
from course_utils.cluster_launch import (
    ENVIRONMENT,
    QLORA_FSDP_CONSTRAINTS,
    LaunchPlan,
    accelerate_command,
    accelerate_config,
    deepspeed_config,
    slurm_script,
    torchrun_command,
    variables_used,
)

NODE = {"SLURM_NODEID": "1", "MASTER_ADDR": "node-a", "SLURM_JOB_ID": "77"}
KINDS = {
    "ddp": "MULTI_GPU",
    "zero1": "DEEPSPEED",
    "zero2": "DEEPSPEED",
    "zero3": "DEEPSPEED",
    "fsdp_full_shard": "FSDP",
    "fsdp_shard_grad_op": "FSDP",
    "fsdp_hybrid_shard": "FSDP",
}


def _plan(stage="ddp", nodes=2, gpus=4, **kwargs):
    return LaunchPlan(
        nodes, gpus, "train.py", ("--lr", "1e-4"), stage=stage, main_port=29517, **kwargs
    )


def _words(command, monkeypatch):
    """The command as the node's shell would split it, with SLURM's variables set as on node 1."""
    for name, value in NODE.items():
        monkeypatch.setenv(name, value)
    return shlex.split(os.path.expandvars(command))


def _launch(plan, tmp_path, monkeypatch):
    """accelerate launch's own parsing of our command with our YAML: (args, config it read)."""
    config_file = tmp_path / "accelerate_config.yaml"
    config_file.write_text(accelerate_config(plan))
    words = _words(accelerate_command(plan, str(config_file)), monkeypatch)
    assert words[:2] == ["accelerate", "launch"]
    args, defaults, _ = _validate_launch_command(launch_command_parser().parse_args(words[2:]))
    return args, defaults


# ------------------------------------------------------------------------------ accelerate config


@pytest.mark.parametrize("stage", list(sharding.STAGES))
def test_yaml_loads_with_accelerates_loader(stage, tmp_path):
    plan = _plan(stage, nodes=2, gpus=4)
    path = tmp_path / "config.yaml"
    path.write_text(accelerate_config(plan))
    config = load_config_from_file(str(path))
    assert config.distributed_type.value == KINDS[stage]
    assert (config.num_machines, config.num_processes) == (2, 8)
    assert config.main_process_port == 29517 and config.mixed_precision == "bf16"
    # per-node values are left to the command line, and the file says so
    assert config.main_process_ip is None
    assert "machine_rank" not in path.read_text().split("# the launch command")[1]
    assert "$SLURM_NODEID" in path.read_text()


def test_fsdp_fields_are_fsdp2_and_follow_the_stage(tmp_path):
    fields = {}
    for stage, offload in [("fsdp_full_shard", "params"), ("fsdp_shard_grad_op", None)]:
        path = tmp_path / f"{stage}.yaml"
        path.write_text(accelerate_config(_plan(stage, offload=offload)))
        fields[stage] = load_config_from_file(str(path)).fsdp_config
    full, grad_op = fields["fsdp_full_shard"], fields["fsdp_shard_grad_op"]
    assert full["fsdp_version"] == 2 and full["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
    # FSDP2: FULL_SHARD is reshard_after_forward=True, SHARD_GRAD_OP is False
    assert full["fsdp_reshard_after_forward"] is True
    assert grad_op["fsdp_reshard_after_forward"] is False
    assert full["fsdp_offload_params"] is True and grad_op["fsdp_offload_params"] is False
    assert "fsdp_use_orig_params" not in full  # removed in FSDP2


def test_deepspeed_fields_in_the_yaml(tmp_path):
    path = tmp_path / "ds.yaml"
    path.write_text(accelerate_config(_plan("ZeRO-3", offload="params")))
    ds = load_config_from_file(str(path)).deepspeed_config
    assert ds["zero_stage"] == 3
    assert (ds["offload_optimizer_device"], ds["offload_param_device"]) == ("cpu", "cpu")
    assert ds["deepspeed_multinode_launcher"] == "standard"  # srun per node, not pdsh over ssh
    path.write_text(accelerate_config(_plan("zero2", nodes=1)))
    ds = load_config_from_file(str(path)).deepspeed_config
    assert (ds["zero_stage"], ds["offload_optimizer_device"]) == (2, "none")
    assert "deepspeed_multinode_launcher" not in ds


def test_single_node_yaml_has_rank_0_and_no_comment_about_slurm(tmp_path):
    path = tmp_path / "one.yaml"
    path.write_text(accelerate_config(_plan(nodes=1, gpus=8)))
    config = load_config_from_file(str(path))
    assert (config.num_machines, config.num_processes, config.machine_rank) == (1, 8, 0)
    assert "SLURM" not in path.read_text()
    path.write_text(accelerate_config(_plan(nodes=1, mixed_precision="no")))
    assert load_config_from_file(str(path)).mixed_precision == "no"  # the string, not YAML's False


# ------------------------------------------------------------------------------ the commands


@pytest.mark.parametrize(
    ("stage", "offload"), [("ddp", None), ("zero2", "optimizer"), ("fsdp_full_shard", "params")]
)
def test_accelerate_launch_reads_the_command_and_the_file(stage, offload, tmp_path, monkeypatch):
    plan = _plan(stage, offload=offload)
    args, _ = _launch(plan, tmp_path, monkeypatch)
    assert (args.num_machines, args.num_processes, int(args.machine_rank)) == (2, 8, 1)
    assert args.main_process_ip == "node-a" and args.main_process_port == 29517
    assert args.training_script == "train.py" and args.training_script_args == ["--lr", "1e-4"]
    assert (args.multi_gpu, args.use_deepspeed, args.use_fsdp) == (
        stage == "ddp",
        stage == "zero2",
        stage == "fsdp_full_shard",
    )


def test_what_accelerate_hands_torchrun_and_the_script(tmp_path, monkeypatch):
    args, _ = _launch(_plan("fsdp_full_shard", offload="params"), tmp_path, monkeypatch)
    env = prepare_multi_gpu_env(args)
    assert (args.nnodes, args.nproc_per_node, args.node_rank) == ("2", "4", 1)
    assert args.rdzv_endpoint == "node-a:29517"
    assert env["FSDP_VERSION"] == "2" and env["FSDP_RESHARD_AFTER_FORWARD"] == "true"
    assert env["FSDP_OFFLOAD_PARAMS"] == "true"
    args, _ = _launch(_plan("fsdp_hybrid_shard"), tmp_path, monkeypatch)
    env = prepare_multi_gpu_env(args)
    assert env["PARALLELISM_CONFIG_DP_REPLICATE_SIZE"] == "2"  # replicated across the nodes
    assert env["PARALLELISM_CONFIG_DP_SHARD_SIZE"] == "4"  # sharded within one
    args, defaults = _launch(_plan("zero3", offload="optimizer"), tmp_path, monkeypatch)
    args.deepspeed_fields_from_accelerate_config = ",".join(defaults.deepspeed_config)
    _, env = prepare_deepspeed_cmd_env(args)
    assert env["ACCELERATE_DEEPSPEED_ZERO_STAGE"] == "3"
    assert env["ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE"] == "cpu"
    assert env["ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE"] == "none"


def test_single_node_accelerate_command_needs_no_slurm():
    command = accelerate_command(_plan(nodes=1, gpus=8), "cfg.yaml")
    assert "$" not in command
    assert command.startswith("accelerate launch --config_file cfg.yaml --num_machines 1")


def test_torchrun_parses_and_uses_a_c10d_rendezvous(monkeypatch):
    words = _words(torchrun_command(_plan("zero3", nodes=4, gpus=8)), monkeypatch)
    assert words[0] == "torchrun"
    args = get_args_parser().parse_args(words[1:])
    assert (args.nnodes, args.nproc_per_node) == ("4", "8")
    assert (args.rdzv_backend, args.rdzv_endpoint, args.rdzv_id) == ("c10d", "node-a:29517", "77")
    assert args.node_rank == 0  # c10d assigns node ranks; torchrun ignores --node_rank there
    assert (args.training_script, args.training_script_args) == ("train.py", ["--lr", "1e-4"])
    one = get_args_parser().parse_args(shlex.split(torchrun_command(_plan(nodes=1, gpus=2)))[1:])
    assert one.standalone and (one.nnodes, one.nproc_per_node) == ("1", "2")


def test_arguments_with_spaces_survive_the_shell(monkeypatch):
    plan = LaunchPlan(2, 2, "my train.py", ("--name", "a b"))
    words = _words(torchrun_command(plan), monkeypatch)
    assert words[-3:] == ["my train.py", "--name", "a b"]


# ------------------------------------------------------------------------------ DeepSpeed


@pytest.mark.parametrize("stage", ["ddp", "zero1", "zero2", "zero3"])
def test_deepspeed_stage_is_what_sharding_says_is_sharded(stage):
    shards = sharding.STAGES[stage]["shards"]  # (optimizer, gradients, weights)
    k = sum(shards)
    assert shards == (True,) * k + (False,) * (3 - k)  # stage k shards the first k of them
    config = deepspeed_config(_plan(stage))
    assert config["zero_optimization"]["stage"] == k
    assert DeepSpeedPlugin(hf_ds_config=config).zero_stage == k  # accelerate reads it the same
    assert config["bf16"] == {"enabled": True} and config["fp16"] == {"enabled": False}
    assert config["train_micro_batch_size_per_gpu"] == "auto"


def test_deepspeed_offload_and_precision():
    config = deepspeed_config(_plan("zero3", offload="params", mixed_precision="fp16"))
    zero = config["zero_optimization"]
    assert zero["offload_optimizer"]["device"] == "cpu" and zero["offload_param"]["device"] == "cpu"
    assert config["fp16"] == {"enabled": True} and config["bf16"] == {"enabled": False}
    plugin = DeepSpeedPlugin(hf_ds_config=config)
    assert (plugin.offload_optimizer_device, plugin.offload_param_device) == ("cpu", "cpu")
    zero1 = deepspeed_config(_plan("zero1", offload="optimizer"))["zero_optimization"]
    assert "offload_optimizer" in zero1 and "offload_param" not in zero1  # ZeRO-Offload: 1, 2, 3
    assert "offload_optimizer" not in deepspeed_config(_plan("zero2"))["zero_optimization"]


# ------------------------------------------------------------------------------ SLURM


def _fake_slurm(tmp_path):
    """A bin folder with scontrol, srun (one run per node, SLURM_NODEID set) and two launchers."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    tools = {
        "scontrol": 'printf "node-a\\nnode-b\\n"',
        "srun": 'for i in $(seq 0 $((SLURM_NNODES - 1))); do SLURM_NODEID=$i "$@"; done',
        "accelerate": 'printf "%q " accelerate "$@" >> "$LOG"; echo >> "$LOG"',
        "torchrun": 'printf "%q " torchrun "$@" >> "$LOG"; echo >> "$LOG"',
    }
    for name, body in tools.items():
        path = bin_dir / name
        path.write_text(f"#!/bin/bash\n{body}\n")
        path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return bin_dir


def _run(script, tmp_path):
    """Run an sbatch script under the fake SLURM; return the launcher lines it ran, per node."""
    path, log = tmp_path / "job.sh", tmp_path / "launched.log"
    path.write_text(script)
    env = {
        "PATH": f"{_fake_slurm(tmp_path)}:{os.environ['PATH']}",
        "LOG": str(log),
        "SLURM_JOB_NODELIST": "node-[a-b]",
        "SLURM_NNODES": "2",
        "SLURM_JOB_ID": "77",
        "SLURM_NODEID": "0",  # as in a real batch step, which runs on the first node
    }
    subprocess.run(["bash", str(path)], cwd=tmp_path, env=env, check=True, timeout=60)
    return [shlex.split(line) for line in log.read_text().splitlines()]


@pytest.mark.parametrize("launcher", ["accelerate", "torchrun"])
def test_slurm_script_is_valid_bash_with_the_right_sbatch_lines(launcher, tmp_path):
    plan = _plan("zero2", nodes=2, gpus=4, partition="gpu", time="12:30:00", job_name="sft-7b")
    script = slurm_script(plan, launcher)
    path = tmp_path / "job.sh"
    path.write_text(script)
    subprocess.run(["bash", "-n", str(path)], check=True)
    sbatch = dict(
        line.split()[1].lstrip("-").split("=", 1)
        for line in script.splitlines()
        if line.startswith("#SBATCH")
    )
    assert sbatch == {
        "job-name": "sft-7b",
        "nodes": "2",
        "ntasks-per-node": "1",
        "gpus-per-node": "4",
        "cpus-per-task": "32",
        "time": "12:30:00",
        "partition": "gpu",
        "output": "%x-%j.out",
    }
    assert 'scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1' in script
    assert "partition" not in slurm_script(_plan(), launcher)


def test_slurm_script_starts_accelerate_once_per_node_with_its_own_rank(tmp_path):
    plan = _plan("zero3", offload="params")
    runs = _run(slurm_script(plan, "accelerate"), tmp_path)
    assert len(runs) == 2
    config = load_config_from_file(str(tmp_path / "accelerate_config.yaml"))  # written by the job
    assert config.deepspeed_config["zero_stage"] == 3
    for node, words in enumerate(runs):
        args = launch_command_parser().parse_args(words[2:])
        assert int(args.machine_rank) == node  # not 0 on both: each node expanded its own
        assert args.main_process_ip == "node-a"  # the first host scontrol listed
        assert (args.num_machines, args.num_processes) == (2, 8)


def test_slurm_script_starts_torchrun_once_per_node(tmp_path):
    runs = _run(slurm_script(_plan(nodes=2, gpus=4), "torchrun"), tmp_path)
    assert len(runs) == 2
    for words in runs:
        args = get_args_parser().parse_args(words[1:])
        assert (args.rdzv_endpoint, args.rdzv_id, args.nnodes) == ("node-a:29517", "77", "2")


# ------------------------------------------------------------------------------ environment, QLoRA


def test_environment_table_of_a_script():
    assert all(text.endswith(".") and ". " not in text for text in ENVIRONMENT.values())
    used = variables_used(slurm_script(_plan(nodes=2), "accelerate"))
    for name in ("MASTER_ADDR", "MASTER_PORT", "SLURM_JOB_NODELIST", "SLURM_NODEID", "RANK"):
        assert name in used
    assert list(used) == [name for name in ENVIRONMENT if name in used]  # ENVIRONMENT's order
    torchrun = variables_used(torchrun_command(_plan(nodes=2)))
    assert list(torchrun) == ["MASTER_ADDR", "SLURM_JOB_ID"]  # not RANK inside a longer name
    assert variables_used(torchrun_command(_plan(nodes=1))) == {}


def test_qlora_fsdp_constraints_cite_their_sources():
    assert 4 <= len(QLORA_FSDP_CONSTRAINTS) <= 8
    for claim, source in QLORA_FSDP_CONSTRAINTS:
        assert claim.endswith(".") and source.startswith("https://")
    assert "bnb_4bit_quant_storage" in QLORA_FSDP_CONSTRAINTS[0][0]


# ------------------------------------------------------------------------------ bad input


def _one_sentence(error):
    message = str(error.value)
    assert message.endswith(".") and ". " not in message, message


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"nodes": 0}, ValueError, "nodes must be a positive integer"),
        ({"gpus_per_node": 2.5}, TypeError, "gpus_per_node"),
        ({"stage": "zero4"}, ValueError, "unknown stage"),
        ({"stage": "ddp", "offload": "optimizer"}, ValueError, "not 'ddp'"),
        ({"stage": "zero2", "offload": "params"}, ValueError, "offload='params'"),
        ({"stage": "fsdp_full_shard", "offload": "optimizer"}, ValueError, "offload='params'"),
        ({"offload": "disk"}, ValueError, "offload must be one of"),
        ({"time": "4h"}, ValueError, "HH:MM:SS"),
        ({"time": "00:00:00"}, ValueError, "HH:MM:SS"),
        ({"time": "01:75:00"}, ValueError, "HH:MM:SS"),
        ({"mixed_precision": "int8"}, ValueError, "mixed_precision must be one of"),
        ({"script": ""}, TypeError, "script"),
        ({"script_args": "--lr 1e-4"}, TypeError, "tuple of strings"),
        ({"job_name": "my job"}, ValueError, "job_name"),
        ({"partition": ""}, ValueError, "partition"),
        ({"main_port": 80}, ValueError, "main_port"),
        ({"cpus_per_task": 0}, ValueError, "cpus_per_task"),
    ],
)
def test_bad_plans_get_one_sentence(kwargs, error, match):
    values = {"nodes": 2, "gpus_per_node": 4, "script": "train.py", **kwargs}
    with pytest.raises(error, match=match) as raised:
        LaunchPlan(**values)
    _one_sentence(raised)


def test_bad_calls_get_one_sentence():
    with pytest.raises(ValueError, match="zero3") as raised:
        deepspeed_config(_plan("fsdp_full_shard"))
    _one_sentence(raised)
    with pytest.raises(ValueError, match="zero2"):
        deepspeed_config(_plan("fsdp_shard_grad_op"))
    with pytest.raises(ValueError, match="launcher must be one of") as raised:
        slurm_script(_plan(), "mpirun")
    _one_sentence(raised)
    for function in (accelerate_config, accelerate_command, torchrun_command, deepspeed_config):
        with pytest.raises(TypeError, match="LaunchPlan") as raised:
            function({"nodes": 2})
        _one_sentence(raised)
    with pytest.raises(TypeError, match="string"):
        variables_used(None)


def test_the_plan_is_normalised_and_frozen():
    plan = LaunchPlan(2, 8, "train.py", ["--lr", "1e-4"], stage="FULL_SHARD", offload="params")
    assert plan.stage == "fsdp_full_shard" and plan.script_args == ("--lr", "1e-4")
    assert plan.processes == 16 and plan.cpus_per_task == 64
    with pytest.raises(AttributeError):
        plan.nodes = 4
