"""Companion package of the course "Fine-tuning LLMs, from ΔW ≈ AB to QLoRA".

One module per idea, each read by the lesson of the same name:

- ``env``        device, dtype, profile (ci/full), seeding, environment report
- ``assets``     the course model (SmolLM2-135M-Instruct), online or from the offline copy
- ``generation`` chat-style generation, one prompt or a batch
- ``course_map`` the lessons, what each teaches and how long it took on real machines
"""

__version__ = "0.1.0"
