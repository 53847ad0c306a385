"""Companion package of the course "Fine-tuning LLMs, from ΔW ≈ AB to QLoRA".

One module per idea, each read by the lesson that teaches it:

- ``env``        device, dtype, profile (ci/full), seeding, environment report       (00)
- ``assets``     the course model (SmolLM2-135M-Instruct), online or from the offline copy (00)
- ``generation`` chat-style generation, one prompt or a left-padded batch            (00)
- ``course_map`` the lessons, what each teaches and how long it took on real machines (00)
- ``memory``     training-memory estimator: weights, gradients, optimizer, activations (01, 03)
- ``lora``       LoRA from scratch (LoRALinear, inject_lora), checked against PEFT      (02)
- ``spectrum``   SVD, Eckart–Young, and the spectrum of a real fine-tuning update ΔW   (02)
- ``quant``      absmax, zero-point, blockwise, NF4, double quant, Q4_1 from scratch    (03)
- ``widgets``    the rank/alpha explorers and the memory calculator                     (02, 03)
- ``data``       JSONL chat data, assistant-only labels, block grouping, the course datasets (04)
- ``train``      LoRA, QLoRA and full fine-tuning through TRL's SFTTrainer, measured   (05-07)
- ``fused_loss`` the LM head and cross-entropy a chunk at a time, gradient in one pass (07, 08)
- ``evaluate``   task scores, perplexity and forgetting, logit equality, sizes on disk (05-07)
- ``unsloth_backend``  the course model through Unsloth, and which backend it ran on       (08)
- ``methods``    the LoRA zoo behind one name: rsLoRA, DoRA, VeRA, LoRA+, LoRA-FA, PiSSA   (09)
- ``delta_lora`` Delta-LoRA (not in PEFT) on top of ``lora``                              (09)
- ``preference`` preference pairs, DPO's implicit reward and margin, TRL's DPOTrainer     (10)
- ``deploy``     generation speed, GGUF export and reload                                 (11)
- ``bench``      the memory estimator measured against real training steps (`make bench`)
- ``bench_training``  speed, MFU and peak memory of every method side by side (`make bench`)
- ``bench_loss``  the fused loss raced alone against transformers' and TRL's (`make bench`)
- ``grading``    nbgrader exercises and batch grading (`make exercises`, `make grade`)
"""

__version__ = "0.1.0"
