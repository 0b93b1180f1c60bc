"""An obviously-correct, slow reference of the Feedback Transformer, token by token."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def _ff(layer, y):
    inner = layer.ff.net[0](y)
    a, g = inner.chunk(2, dim=-1)
    return layer.ff.net[3](a * F.gelu(g))


def reference_forward(model, x, prefix=None, context=None, context_mask=None):
    """Logits (b, n, V) and the final memory [(time, k (b,h,d), v (b,h,d))]."""
    B, N = x.shape
    W, M, H, D = model.seq_len, model.mem_len, model.heads, model.dim_head
    emb = model.token_emb.weight[x]
    memory = []
    if prefix is not None:
        m0 = prefix[0].shape[2]
        memory = [(i - m0, prefix[0][:, :, i], prefix[1][:, :, i]) for i in range(m0)]
    memory = memory[max(0, len(memory) - M) :] if M else []
    mix = None if model.layer_weight is None else model.layer_weight.softmax(-1)
    norm = model.attn_norm

    def kv(h):
        k, v = F.linear(norm(h), model.to_kv.weight).chunk(2, dim=-1)
        return k.reshape(B, H, D), v.reshape(B, H, D)

    def bias(times, t):
        rel = torch.tensor([time - t for time in times])
        table = model.rel_pos.relative_attention_bias.weight
        return table[model.rel_pos.bucket(rel)].T  # (h, j)

    outs = []
    for s in range(0, N, W):
        window = list(range(s, min(s + W, N)))
        xs = {t: emb[:, t] for t in window}
        states = {t: [xs[t]] for t in window}
        for layer in model.layers:
            new = {}
            for t in window:
                q = F.linear(norm(xs[t]), layer.to_q.weight).reshape(B, H, D)
                keys = list(memory) + [(u, *kv(xs[u])) for u in window if u < t]
                if keys:
                    K = torch.stack([k for _, k, _ in keys], dim=2)
                    V = torch.stack([v for _, _, v in keys], dim=2)
                    scores = torch.einsum("bhd,bhjd->bhj", q, K) / math.sqrt(D)
                    p = (scores + bias([u for u, _, _ in keys], t)).softmax(-1)
                    o = torch.einsum("bhj,bhjd->bhd", p, V)
                else:
                    o = q.new_zeros(B, H, D)
                y = xs[t] + layer.to_out(o.reshape(B, H * D))
                if layer.cross is not None:
                    c = layer.cross
                    cq = c.to_q(c.norm(y)).reshape(B, H, D)
                    ck, cv = c.to_kv(context).chunk(2, dim=-1)
                    ck = ck.reshape(B, -1, H, D)
                    cv = cv.reshape(B, -1, H, D)
                    cs = torch.einsum("bhd,bshd->bhs", cq, ck) / math.sqrt(D)
                    if context_mask is not None:
                        cs = cs.masked_fill(~context_mask[:, None, :], float("-inf"))
                    co = torch.einsum("bhs,bshd->bhd", cs.softmax(-1), cv)
                    y = y + c.to_out(co.reshape(B, H * D))
                y = y + _ff(layer, layer.ff_norm(y))
                new[t] = y
            xs = new
            for t in window:
                states[t].append(xs[t])
        for t in window:
            outs.append(xs[t])
            merged = xs[t] if mix is None else sum(w * h for w, h in zip(mix, states[t]))
            memory.append((t, *kv(merged)))
        memory = memory[max(0, len(memory) - M) :] if M else []
    return model.to_logits(torch.stack(outs, dim=1)), memory
