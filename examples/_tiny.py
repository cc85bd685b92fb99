"""The small random model the CPU examples share (so each runs in well under two minutes on 2
cores). Its weights are random: its tokens mean nothing, but they differ between exact and
compressed attention (initializer_range 0.3), so each comparison is a real one. Swap in any
transformers causal LM (`AutoModelForCausalLM.from_pretrained(...)`) for real text."""
import torch
from transformers import LlamaConfig, LlamaForCausalLM

VOCAB = 256


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=128, intermediate_size=256,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=4096, initializer_range=0.3)
    model = LlamaForCausalLM(config).eval()
    model.generation_config.eos_token_id = None   # generate exactly max_new_tokens
    return model


def random_prompt(length: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (1, length), generator=torch.Generator().manual_seed(seed))
