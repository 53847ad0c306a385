"""The tiny random Llama the unit tests train: 2 layers, the course tokenizer's vocabulary."""

import torch

TINY = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "tie_word_embeddings": True,
}


def tiny_model(tokenizer, **overrides):
    """A random 2-layer Llama with the course tokenizer's vocabulary (fields of TINY overridable)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, **{**TINY, **overrides}
    )
    return LlamaForCausalLM(config)
