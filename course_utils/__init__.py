"""Companion package of the course "Fine-tuning LLMs, from ΔW ≈ AB to QLoRA".

One module per idea, each read by the lesson that teaches it:

- ``env``        device, dtype, profile (ci/full), seeding, environment report       (00)
- ``assets``     the course model (SmolLM2-135M-Instruct), online or from the offline copy (00)
- ``generation`` chat-style generation, one prompt or a left-padded batch            (00)
- ``course_map`` the lessons, what each teaches and how long it took on real machines (00)
- ``memory``     training-memory estimator: weights, gradients, optimizer, activations (01, 03)
- ``model_choice`` choosing a base model: serving memory, KV cache, decode speed, card facts (01)
- ``lora``       LoRA from scratch (LoRALinear, inject_lora), checked against PEFT      (02)
- ``spectrum``   SVD, Eckart–Young, and the spectrum of a real fine-tuning update ΔW   (02)
- ``quant``      absmax, zero-point, blockwise, NF4, double quant, Q4_1 from scratch    (03)
- ``widgets``    the rank/alpha explorers and the memory calculator                     (02, 03)
- ``checks``     one-sentence argument checks shared by the modules
- ``claims``     a lesson's claims, recorded where measured and checked in its last cell (00-15)
- ``data``       JSONL chat data, assistant-only labels, block grouping, the course datasets (read),
                 prompt/completion rows for TRL's SFTTrainer                               (04, 05)
- ``curation``   a task's checks for new examples, de-duplication, a split by group     (04)
- ``callbacks``  TrainingMeter: a TrainerCallback that records loss, time, tokens and
                 peak memory                                                    (05-07, 10-15)
- ``peak_memory`` the peak bytes of live tensors on a CPU or a GPU                         (06, 07)
- ``evaluate``   task scores (fast batched scoring), Wilson intervals, perplexity and
                 forgetting, logit equality, sizes on disk                      (05-07, 10-15)
- ``hyperparameters`` the `make sweeps` grid, its plots, the generated recommendation table (08)
- ``sharding``   bytes per device under DDP, ZeRO-1/2/3 and FSDP, with offload, in N devices (09)
- ``cluster_launch`` accelerate config, launch lines, DeepSpeed config, SLURM script from one plan (09)
- ``fused_loss`` the LM head and cross-entropy a chunk at a time, gradient in one pass      (10)
- ``swiglu``     the MLP's SiLU(gate)·up keeping two tensors for backward                    (10)
- ``unsloth_backend``  the course model through Unsloth, and which backend it ran on       (10)
- ``framework_configs`` one run as TRL arguments, an Axolotl and a LLaMA-Factory YAML      (11)
- ``framework_runs`` Axolotl / LLaMA-Factory in their own environments, run and measured (11)
- ``methods``    the LoRA zoo behind one name: rsLoRA, DoRA, VeRA, LoRA+, LoRA-FA, PiSSA   (12)
- ``delta_lora`` Delta-LoRA (not in PEFT) on top of ``lora``                              (12)
- ``preference`` preference pairs, DPO's implicit reward and margin, TRL's DPOTrainer     (13)
- ``deploy``     generation speed, GGUF export and reload                                 (14)
- ``own_data``   your file in any common shape: read, validate by line, convert for SFTTrainer (15)

The tools (benchmarks, grading, the dataset builders, timings) are the package ``course_tools``,
which imports this one; this one never imports it.
"""

from . import env  # noqa: F401  (first: it quiets bitsandbytes' install advice before PEFT loads it)

__version__ = "0.1.0"
