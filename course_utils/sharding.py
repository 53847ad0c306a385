"""Memory per device when one training run is spread over N devices: DDP, ZeRO-1/2/3, FSDP.

Lesson 09 (scale-out), issue 28. It builds on :func:`course_utils.memory.estimate`, which says
what *one* device holds, split into weights, gradients, optimizer states and activations.

Data parallelism gives every device its own slice of each batch. What differs between the
schemes is which of the first three parts each device keeps whole and which it keeps a 1/N
shard of (Rajbhandari et al. 2020, "ZeRO: Memory Optimizations Toward Training Trillion
Parameter Models", and PyTorch's FSDP, Zhao et al. 2023):

=====================  ===========  ===========  ===========  ==============================
stage                  optimizer    gradients    weights      the same thing elsewhere
=====================  ===========  ===========  ===========  ==============================
``ddp``                whole        whole        whole        DDP, FSDP ``NO_SHARD``, ZeRO-0
``zero1``              1/N          whole        whole        DeepSpeed ``stage: 1``
``zero2``              1/N          1/N          whole        DeepSpeed ``stage: 2``
``zero3``              1/N          1/N          1/N          DeepSpeed ``stage: 3``
``fsdp_full_shard``    1/N          1/N          1/N          ``FULL_SHARD``; FSDP2 ``fully_shard``
``fsdp_shard_grad_op`` 1/N          1/N          whole        ``SHARD_GRAD_OP``; FSDP2 with
                                                              ``reshard_after_forward=False``
``fsdp_hybrid_shard``  1/k          1/k          1/k          ``HYBRID_SHARD``: sharded over the
                                                              k devices of a node, replicated
                                                              across nodes
=====================  ===========  ===========  ===========  ==============================

With mixed-precision AdamW (bf16 weights and gradients, an fp32 master copy and two fp32
moments: 2 + 2 + 12 bytes per parameter) and Ψ parameters this is the paper's accounting:
DDP 16Ψ, ZeRO-1 4Ψ + 12Ψ/N, ZeRO-2 2Ψ + 14Ψ/N, ZeRO-3 16Ψ/N per device.

What the table leaves out, and this module counts:

* **activations** are per device and *not* sharded by any of these schemes: each device runs
  the forward pass on its own micro-batch (``batch`` in ``estimate`` is the per-device batch).
  Gradient checkpointing, a smaller micro-batch or sequence/tensor parallelism shrink them;
* **the gathered unit**: ZeRO-3/FSDP all-gather one wrapped unit (a decoder layer, or the root
  with the embeddings) before using it and free it after, so each device briefly holds one whole
  unit's weights and, in the backward pass, its whole gradient and the copy of it that the
  reduce-scatter reads: three times the unit for full fine-tuning (:func:`largest_unit_params`;
  measured with FSDP2 on two CPU processes in lesson 09);
* **the weight shard beside whole weights**: without an fp32 master copy (fp32 or pure bf16
  training) a sharded optimizer under ZeRO-1/2 or SHARD_GRAD_OP updates its shard of the
  trainable weights, which is kept apart from the whole weights that forward and backward use
  (FSDP's sharded parameters, DeepSpeed's fp32 partition): 1/N of the trainable weights more.
  With mixed precision that shard is the master copy, already among the optimizer states.
  (DeepSpeed keeps such an fp32 partition beside ZeRO-3's weight shard too, even in fp32
  training, and sizeable bucket buffers; FSDP does neither. Not counted here.);
* **DDP's buckets**: PyTorch's DDP all-reduces gradients in flat buckets it allocates once and
  keeps, a whole copy of the trainable gradients held from the first backward pass to the end
  (with ``gradient_as_bucket_view=True`` the gradients *are* views into the buckets, so there is
  no second copy, but neither are they freed between steps). Under ``ddp`` on more than one
  device the gradients therefore sit beside the activations at the start of the backward pass
  instead of replacing them as they are freed (measured on two CPU processes in lesson 09);
* **LoRA/QLoRA**: the frozen base has no gradients or optimizer states, so ZeRO-1/2 save almost
  nothing there; only sharding the weights (ZeRO-3/FSDP full shard) divides the base model.

**CPU offload** moves bytes from the device to the host's RAM (``host`` below): ``"optimizer"``
moves the optimizer-state shard and, for stages that shard gradients, the gradient shard too
(DeepSpeed's ZeRO-Offload steps the optimizer on the CPU, so each reduced gradient partition is
copied there); ``"params"`` (ZeRO-3-like stages only) moves the weight shard as well, as
FSDP's ``CPUOffload(offload_params=True)`` and DeepSpeed's ``offload_param`` do, leaving only the
gathered unit on the device. Communication buffers and the framework's own overhead are not
counted: these are planning numbers, checked against two real CPU processes in lesson 09.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

from .checks import WrongType, one_of, positive_int
from .memory import (
    BYTES_PER_DTYPE,
    GB,
    METHODS,
    MemoryEstimate,
    estimate,
    fits,
    get_config,
    lora_trainable_params,
    param_groups,
)
from .quant import double_quant_bits_per_param

__all__ = [
    "OFFLOADS",
    "STAGES",
    "ShardedEstimate",
    "devices_needed",
    "estimate_per_device",
    "fits_on_devices",
    "largest_unit_params",
    "normalise_stage",
    "per_device",
    "per_process_batch",
]

#: What each stage shards, as (optimizer states, gradients, weights), and how it is named by
#: the libraries that implement it.
STAGES: dict[str, dict] = {
    "ddp": {"shards": (False, False, False), "also": "DDP, FSDP NO_SHARD, DeepSpeed stage 0"},
    "zero1": {"shards": (True, False, False), "also": "DeepSpeed zero_optimization.stage 1"},
    "zero2": {"shards": (True, True, False), "also": "DeepSpeed zero_optimization.stage 2"},
    "zero3": {"shards": (True, True, True), "also": "DeepSpeed zero_optimization.stage 3"},
    "fsdp_full_shard": {
        "shards": (True, True, True),
        "also": "FSDP FULL_SHARD; FSDP2 fully_shard(reshard_after_forward=True)",
    },
    "fsdp_shard_grad_op": {
        "shards": (True, True, False),
        "also": "FSDP SHARD_GRAD_OP; FSDP2 fully_shard(reshard_after_forward=False)",
    },
    "fsdp_hybrid_shard": {
        "shards": (True, True, True),
        "also": "FSDP HYBRID_SHARD; FSDP2 fully_shard on a 2-D (replicate, shard) mesh",
    },
}

#: Other spellings learners meet (case, dashes and underscores are ignored).
_ALIASES = {
    "zero0": "ddp",
    "noshard": "ddp",
    "fsdpnoshard": "ddp",
    "fullshard": "fsdp_full_shard",
    "fsdp": "fsdp_full_shard",
    "fsdp2": "fsdp_full_shard",
    "shardgradop": "fsdp_shard_grad_op",
    "hybridshard": "fsdp_hybrid_shard",
    "hybrid": "fsdp_hybrid_shard",
}

#: What CPU offload may move to the host: nothing, the optimizer states (with the gradient
#: shard where gradients are sharded), or the weights as well (ZeRO-3-like stages only).
OFFLOADS = (None, "optimizer", "params")


def normalise_stage(stage: object) -> str:
    """Return the key in STAGES for a stage name such as ``"ZeRO-2"`` or ``"FULL_SHARD"``."""
    if not isinstance(stage, str):
        raise WrongType(f"stage must be a name such as 'zero2' (got {stage!r}); see STAGES.")
    compact = re.sub(r"[^a-z0-9]", "", stage.lower())
    by_compact = {re.sub(r"[^a-z0-9]", "", name): name for name in STAGES}
    name = by_compact.get(compact) or _ALIASES.get(compact)
    if name is None:
        raise ValueError(f"unknown stage {stage!r}; use one of {list(STAGES)}.")
    return name


def _shard_group(stage: str, n_devices: int, devices_per_node: int | None) -> int:
    """How many devices one copy of the sharded states is split over."""
    if stage != "fsdp_hybrid_shard":
        if devices_per_node is not None:
            raise ValueError(
                f"devices_per_node only applies to 'fsdp_hybrid_shard', not {stage!r}; leave it out."
            )
        return n_devices
    if devices_per_node is None:
        raise ValueError(
            "stage 'fsdp_hybrid_shard' needs devices_per_node, the k devices one copy is sharded "
            "over (devices_per_node=8 for nodes of 8 GPUs)."
        )
    k = positive_int(devices_per_node, "devices_per_node", "devices_per_node=8")
    if k > n_devices:
        raise ValueError(
            f"devices_per_node={k} is more than the n_devices={n_devices} given; pass at most "
            f"devices_per_node={n_devices}."
        )
    if n_devices % k:
        raise ValueError(
            f"devices_per_node={k} does not divide n_devices={n_devices}; hybrid sharding needs "
            f"whole nodes, such as n_devices={k * math.ceil(n_devices / k)}."
        )
    return k


@dataclass(frozen=True)
class ShardedEstimate:
    """Bytes on each of ``n_devices`` devices (and in host RAM per process) under one stage.

    ``weights``, ``gradients`` and ``optimizer`` are what stays on the device after sharding
    and offload (``weights`` includes the optimizer's own shard of the trainable weights where
    whole weights are kept beside it); ``activations`` are the per-device micro-batch's,
    unsharded; ``gathered`` is one all-gathered unit (weights, gradient and the reduce-scatter's
    copy) under ZeRO-3-like stages; ``host`` the bytes each process keeps in CPU RAM because of
    offload. ``base`` is the one-device estimate. ``persistent_gradients``: the gradients are
    held throughout (DDP's buckets), not only from the backward pass on.
    """

    stage: str
    n_devices: int
    shard_group: int
    offload: str | None
    weights: int
    gradients: int
    optimizer: int
    activations: int
    gathered: int
    temporaries: int
    host: int
    base: MemoryEstimate
    notes: tuple[str, ...] = field(default=())
    persistent_gradients: bool = False

    @property
    def model_states(self) -> int:
        """Weights + gradients + optimizer states on the device: the ZeRO paper's figure."""
        return self.weights + self.gradients + self.optimizer

    @property
    def total(self) -> int:
        """The peak per device, as :attr:`MemoryEstimate.total` counts it, plus the gathered unit."""
        if self.persistent_gradients:  # DDP's buckets: the gradients beside the activations
            extra = self.gradients + max(self.activations, self.temporaries)
        else:
            extra = max(self.activations, self.gradients + self.temporaries)
        return self.weights + self.optimizer + self.gathered + extra

    def breakdown(self) -> dict[str, int]:
        """Bytes per part on one device, the total, and the host bytes per process."""
        return {
            "weights": self.weights,
            "gradients": self.gradients,
            "optimizer": self.optimizer,
            "activations": self.activations,
            "gathered": self.gathered,
            "total": self.total,
            "host": self.host,
        }

    def to_gb(self) -> dict[str, float]:
        """The breakdown in GB (GiB)."""
        return {name: value / GB for name, value in self.breakdown().items()}

    def __str__(self) -> str:
        """A small table for printing in a notebook."""
        offload = f", offload {self.offload}" if self.offload else ""
        head = f"{self.stage} on {self.n_devices} devices{offload}: {self.base.method} / "
        lines = [head + f"{self.base.dtype}, per device"]
        lines += [f"  {name:<12}{gb:8.2f} GB" for name, gb in self.to_gb().items()]
        lines += [f"  note: {note}" for note in (*self.base.notes, *self.notes)]
        return "\n".join(lines)


def _split(value: int, parts: int) -> int:
    """One device's shard of ``value`` bytes (rounded up: frameworks pad the last shard)."""
    return math.ceil(value / parts)


def per_device(
    est: MemoryEstimate,
    n_devices: int,
    stage: str = "ddp",
    *,
    devices_per_node: int | None = None,
    offload: str | None = None,
    unit_bytes: int = 0,
) -> ShardedEstimate:
    """Bytes per device when the run that ``est`` describes is spread over ``n_devices``.

    ``stage`` is a key of STAGES (or a spelling such as ``"ZeRO-3"``, ``"FULL_SHARD"``);
    ``devices_per_node`` is the k of ``fsdp_hybrid_shard``; ``offload`` one of OFFLOADS;
    ``unit_bytes`` the bytes the largest unit ZeRO-3/FSDP gathers whole costs at once (its
    weights, its gradient and the reduce-scatter's copy of it), which
    :func:`estimate_per_device` works out from the model's shape.
    """
    if not isinstance(est, MemoryEstimate):
        raise WrongType(
            f"est must be a MemoryEstimate (got {type(est).__name__}); make one with "
            "course_utils.memory.estimate()."
        )
    n = positive_int(n_devices, "n_devices", "n_devices=8")
    stage = normalise_stage(stage)
    k = _shard_group(stage, n, devices_per_node)
    offload = one_of(offload, "offload", OFFLOADS)
    if isinstance(unit_bytes, bool) or not isinstance(unit_bytes, int) or unit_bytes < 0:
        raise WrongType(f"unit_bytes must be an int >= 0 (got {unit_bytes!r}); try unit_bytes=0.")
    opt_shard, grad_shard, weight_shard = STAGES[stage]["shards"]
    if offload and not opt_shard:
        raise ValueError(
            "CPU offload needs a sharded stage (zero1, zero2, zero3 or an fsdp_* one), not 'ddp'."
        )
    if offload == "optimizer" and stage.startswith("fsdp"):
        raise ValueError(
            f"FSDP offloads the weights, gradients and optimizer states together, not the "
            f"optimizer alone; use offload='params' with {stage!r}, or a zero1/zero2/zero3 stage."
        )
    if offload == "params" and not weight_shard:
        raise ValueError(
            f"offload='params' needs a stage that shards the weights (zero3, fsdp_full_shard, "
            f"fsdp_hybrid_shard), not {stage!r}; use offload='optimizer'."
        )

    weights = _split(est.weights, k) if weight_shard else est.weights
    gradients = _split(est.gradients, k) if grad_shard else est.gradients
    optimizer = _split(est.optimizer, k) if opt_shard else est.optimizer
    temporaries = _split(est.temporaries, k) if opt_shard else est.temporaries
    # the shard of the trainable weights a sharded optimizer updates, beside the whole weights
    # (gradients have the trainable weights' dtype and count); a master copy would be it
    own_shard = 0
    if opt_shard and not weight_shard and not est.master_weights:
        own_shard = _split(est.gradients, k)
    host = 0
    if offload:
        host += optimizer + temporaries + own_shard
        optimizer = temporaries = own_shard = 0
        if grad_shard:
            host, gradients = host + gradients, 0
    if offload == "params":
        host, weights = host + weights, 0
    notes = ["activations are per device (its own micro-batch) and not sharded"]
    gathered = unit_bytes if weight_shard else 0
    if weight_shard and not unit_bytes:
        notes.append("the all-gathered unit is not counted: pass a config to include it")
    if k < n:
        notes.append(f"sharded over groups of {k} devices, replicated {n // k} times")
    buckets = stage == "ddp" and n > 1
    if buckets:
        notes.append("DDP keeps the gradients in its all-reduce buckets between steps")
    return ShardedEstimate(
        stage=stage,
        n_devices=n,
        shard_group=k,
        offload=offload,
        weights=weights + own_shard,
        gradients=gradients,
        optimizer=optimizer,
        activations=est.activations,
        gathered=gathered,
        temporaries=temporaries,
        host=host,
        base=est,
        notes=tuple(notes),
        persistent_gradients=buckets,
    )


def largest_unit_params(config: object) -> int:
    """Parameters of the largest unit FSDP/ZeRO-3 gathers whole: one decoder layer or the root.

    The usual wrapping puts each decoder layer in its own unit and leaves the embeddings, the
    final norm and the LM head (tied or not) in the root unit.
    """
    cfg = get_config(config)
    groups = param_groups(cfg)
    layers = cfg["num_hidden_layers"]
    norms = cfg["hidden_size"]  # the final norm, in the root unit
    layer = (groups["linear"] + groups["other"] - norms) // layers
    root = groups["embeddings"] + groups["lm_head"] + norms
    return max(layer, root)


def _unit_bytes(cfg: dict, method: str, dtype: str, adapter_dtype: str, lora: int) -> int:
    """Bytes of the largest gathered unit: its weights as stored, its gradient and a copy of it.

    The copy is the buffer the reduce-scatter reads (FSDP2 measured on two CPU processes: a
    SmolLM2 step held the root's embeddings three times over beside the shards).
    """
    groups = param_groups(cfg)
    layers = cfg["num_hidden_layers"]
    w = BYTES_PER_DTYPE[dtype]
    h = cfg["hidden_size"]
    linear = groups["linear"] // layers
    other = (groups["other"] - h) // layers
    root = (groups["embeddings"] + groups["lm_head"] + h) * w
    if method == "full":
        return 3 * max((linear + other) * w, root)  # weights, gradient, reduce-scatter copy
    a = BYTES_PER_DTYPE[adapter_dtype]
    linear_bytes = linear * (w if method == "lora" else double_quant_bits_per_param() / 8)
    adapters = lora // layers
    layer = math.ceil(linear_bytes) + other * w + 3 * adapters * a
    return max(layer, root)


def _estimate_and_unit(config_or_params: object, method: str, **kwargs) -> tuple:
    """The one-device estimate and the bytes of its largest gathered unit (0: shapes unknown)."""
    est = estimate(config_or_params, method, **kwargs)
    if isinstance(config_or_params, int):
        return est, 0
    cfg = get_config(config_or_params)
    lora = 0
    if method != "full":
        lora = kwargs.get("trainable_params") or lora_trainable_params(
            cfg, kwargs.get("lora_r", 16), kwargs.get("lora_targets", "all-linear")
        )
    dtype, adapter_dtype = kwargs.get("dtype", "fp32"), kwargs.get("adapter_dtype", "fp32")
    return est, _unit_bytes(cfg, method, dtype, adapter_dtype, lora)


def estimate_per_device(
    config_or_params: object,
    method: str = "full",
    n_devices: int = 2,
    stage: str = "ddp",
    *,
    devices_per_node: int | None = None,
    offload: str | None = None,
    **estimate_kwargs,
) -> ShardedEstimate:
    """:func:`course_utils.memory.estimate` per device: the same arguments, spread over N devices.

    ``batch`` (in ``estimate_kwargs``) is the micro-batch of *one* device. With a config or a
    preset name the gathered unit of ZeRO-3-like stages is counted; with a bare parameter count
    it is not (and a note says so).
    """
    est, unit = _estimate_and_unit(config_or_params, method, **estimate_kwargs)
    return per_device(
        est, n_devices, stage, devices_per_node=devices_per_node, offload=offload, unit_bytes=unit
    )


def fits_on_devices(
    config_or_params: object,
    method: str,
    gpu: str | float,
    n_devices: int,
    stage: str,
    *,
    usable_fraction: float = 0.9,
    devices_per_node: int | None = None,
    offload: str | None = None,
    **estimate_kwargs,
) -> bool:
    """Whether the run fits on ``n_devices`` × ``gpu`` (a name in GPUS or GB) under ``stage``."""
    one_of(method, "method", METHODS)
    sharded = estimate_per_device(
        config_or_params,
        method,
        n_devices,
        stage,
        devices_per_node=devices_per_node,
        offload=offload,
        **estimate_kwargs,
    )
    return fits(sharded.total, gpu, usable_fraction)


def devices_needed(
    config_or_params: object,
    method: str,
    gpu: str | float,
    stage: str,
    *,
    max_devices: int = 1024,
    usable_fraction: float = 0.9,
    offload: str | None = None,
    **estimate_kwargs,
) -> int | None:
    """Fewest devices of one kind on which the run fits under ``stage`` (None: not even max_devices).

    DDP replicates everything, so it fits on one device or on none; the sharded stages shrink
    with N until the unsharded parts (activations, and ZeRO-1/2's whole weights) dominate.
    """
    max_devices = positive_int(max_devices, "max_devices", "max_devices=1024")
    if normalise_stage(stage) == "fsdp_hybrid_shard":
        raise ValueError("devices_needed does not size 'fsdp_hybrid_shard'; use 'zero3' for it.")
    est, unit = _estimate_and_unit(config_or_params, method, **estimate_kwargs)
    for n in range(1, max_devices + 1):
        sharded = per_device(est, n, stage, offload=offload, unit_bytes=unit)
        if fits(sharded.total, gpu, usable_fraction):
            return n
    return None


def per_process_batch(global_batch: int, n_processes: int, available: int | None = None) -> int:
    """The micro-batch of each process for a global batch, checking the launch makes sense.

    ``available`` is how many devices (GPUs, or CPU cores for a CPU run) there are to put the
    processes on; more processes than that would share one and run no faster.
    """
    global_batch = positive_int(global_batch, "global_batch", "global_batch=8")
    n = positive_int(n_processes, "n_processes", "n_processes=2")
    if available is not None:
        available = positive_int(available, "available", "available=os.cpu_count()")
        if n > available:
            raise ValueError(
                f"n_processes={n} is more than the {available} devices or cores available; "
                f"launch at most {available} processes."
            )
    if global_batch % n:
        raise ValueError(
            f"global_batch={global_batch} is not divisible by n_processes={n}; use a multiple "
            f"of {n} such as global_batch={n * math.ceil(global_batch / n)}."
        )
    return global_batch // n
