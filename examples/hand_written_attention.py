"""A hand-written decoder (nanoGPT style: matmul, masked_fill, softmax, matmul; a tuple cache;
explicit positions) compiled unchanged with backend="rocketkv".

Shows that the pass finds attention written by hand, not only transformers' SDPA call: the
prompt's cache comes back compressed, each decode step attends over what was kept, and the
model code has no rkv_compile in it. CPU: about 30 s.

    python examples/hand_written_attention.py
"""
import math

import torch
import torch.nn.functional as F
from torch import nn

import rkv_compile

VOCAB, DIM, HEADS, LAYERS = 256, 128, 4, 2


class TinyGPT(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.tok, self.pos = nn.Embedding(VOCAB, DIM), nn.Embedding(4096, DIM)
        self.qkv = nn.ModuleList(nn.Linear(DIM, 3 * DIM) for _ in range(LAYERS))
        self.proj = nn.ModuleList(nn.Linear(DIM, DIM) for _ in range(LAYERS))
        self.head = nn.Linear(DIM, VOCAB)

    def forward(self, idx, positions, past=None):
        B, T = idx.shape
        x = self.tok(idx) + self.pos(positions)
        presents = []
        for i in range(LAYERS):
            q, k, v = (t.view(B, T, HEADS, -1).transpose(1, 2)
                       for t in self.qkv[i](x).split(DIM, dim=-1))
            if past is not None:
                k, v = torch.cat([past[i][0], k], 2), torch.cat([past[i][1], v], 2)
            presents.append((k, v))
            n = k.shape[2]
            mask = torch.ones(T, n, dtype=torch.bool).tril(n - T)[None, None]
            att = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])
            att = F.softmax(att.masked_fill(~mask, float("-inf")), dim=-1)
            x = x + self.proj[i]((att @ v).transpose(1, 2).reshape(B, T, DIM))
        return self.head(x), tuple(presents)


@torch.no_grad()
def greedy(forward, idx, steps):
    T = idx.shape[1]
    logits, past = forward(idx, torch.arange(T)[None])
    tokens = [int(logits[0, -1].argmax())]
    for step in range(steps - 1):
        logits, past = forward(torch.tensor([[tokens[-1]]]), torch.tensor([[T + step]]), past)
        tokens.append(int(logits[0, -1].argmax()))
    return tokens, past


def main() -> dict:
    model = TinyGPT().eval()
    idx = torch.randint(0, VOCAB, (1, 500), generator=torch.Generator().manual_seed(1))
    compiled = torch.compile(model, backend="rocketkv",
                             options={"token_budget": 96, "max_new_tokens": 6})
    tokens, past = greedy(compiled, idx, 6)
    exact, exact_past = greedy(model, idx, 6)
    stored = [layer.lengths[0] for layer in rkv_compile.stored(past)]
    print(f"prompt: {idx.shape[1]} tokens; token_budget 96")
    print(f"rocketkv: tokens {tokens}, stored per layer {stored}")
    print(f"exact:    tokens {exact}, stored per layer {[k.shape[2] for k, _ in exact_past]}")
    return {"tokens": tokens, "exact": exact, "stored": stored}


if __name__ == "__main__":
    main()
