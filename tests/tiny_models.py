"""Tiny Hugging Face models built from configs (no downloads), with fixed seeds."""

import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM


def tiny_llama(seed: int = 0, tie: bool = False) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=96, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=tie,
    )
    return LlamaForCausalLM(config).eval()


def tiny_qwen2(seed: int = 0) -> Qwen2ForCausalLM:
    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=96, hidden_size=48, intermediate_size=112, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
    )
    return Qwen2ForCausalLM(config).eval()


def tiny_gpt2(seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=96, n_embd=48, n_layer=2, n_head=4, n_positions=64)
    return GPT2LMHeadModel(config).eval()


def token_batch(seed: int = 0, batch: int = 2, length: int = 12, vocab: int = 96) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


def train_with_dropout(*models: torch.nn.Module) -> list:
    """Put Llama-like ``models`` in training mode with attention dropout 0.5, their first decoder block in
    eval mode (mixed modes), as a user might hand them over; returns every module's mode, model by model."""
    for model in models:
        for block in model.model.layers:
            block.self_attn.attention_dropout = 0.5
        model.train()
        model.model.layers[0].eval()
    return [[m.training for m in model.modules()] for model in models]
