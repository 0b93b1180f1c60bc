"""A slow, obviously-correct reference of the Feedback Transformer, one token at a time.

It follows the definition in the README and the model's docstrings, with none of the
model's machinery (no preallocated buffers, no custom autograd, no fused projections, no
precomputed bias tables), only the model's parameters:

* the memory is a Python list of ``(time, key, value)``, one entry per past step, of which
  the newest ``mem_len`` are kept;
* a window of ``seq_len`` steps runs layer by layer; at each layer, the query of step ``t``
  attends to every memory entry and to the keys/values of the window's earlier steps
  ``u < t`` computed from their input to that layer (with the shared pre-norm and key/value
  projection); a query with nothing to attend to gets a zero attention output;
* the T5 bias of a key at time ``u`` for the query at time ``t`` is the table row of the
  bucket of ``u - t``;
* after the window, each step's memory entry is the shared key/value projection of the
  normalised softmax-weighted mix of its embedding and layer outputs (or of its last
  layer output with ``keep_last_hidden``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def _feedforward(layer, y):
    """The GEGLU feed-forward of ``layer`` on the normalised ``y``."""
    first, _, _, last = layer.ff.net
    a, gate = first(y).chunk(2, dim=-1)
    return last(a * F.gelu(gate))


def _attention(q, entries, bias_row, d):
    """``q`` ``(b, h, d)`` over ``entries`` ``[(time, k (b, h, d), v (b, h, d))]``."""
    if not entries:
        return torch.zeros_like(q)
    keys = torch.stack([k for _, k, _ in entries], dim=2)
    values = torch.stack([v for _, _, v in entries], dim=2)
    scores = torch.einsum("bhd,bhjd->bhj", q, keys) / math.sqrt(d)
    weights = (scores + bias_row).softmax(dim=-1)
    return torch.einsum("bhj,bhjd->bhd", weights, values)


def reference_forward(model, x, prefix=None, context=None, context_mask=None):
    """Logits ``(b, n, num_tokens)`` of ``model`` on ``x`` ``(b, n)`` after the memory
    ``prefix`` (``(keys, values)`` of shape ``(b, h, m, d)`` or ``None``), and the final
    memory as a list ``[(time, key (b, h, d), value (b, h, d))]``, oldest first."""
    B, N = x.shape
    W, M, H, D = model.seq_len, model.mem_len, model.heads, model.dim_head
    emb = model.token_emb.weight[x]
    memory = []
    if prefix is not None:
        m0 = prefix[0].shape[2]
        memory = [(i - m0, prefix[0][:, :, i], prefix[1][:, :, i]) for i in range(m0)]
    memory = memory[max(0, len(memory) - M) :] if M else []
    norm = model.attn_norm
    table = model.rel_pos.relative_attention_bias.weight  # (buckets, h)

    def key_value(state):
        k, v = F.linear(norm(state), model.to_kv.weight).chunk(2, dim=-1)
        return k.reshape(B, H, D), v.reshape(B, H, D)

    def bias_row(entries, t):
        distance = torch.tensor([u - t for u, _, _ in entries], dtype=torch.long)
        return table[model.rel_pos.bucket(distance)].T  # (h, j)

    outputs = []
    for start in range(0, N, W):
        window = list(range(start, min(start + W, N)))
        xs = {t: emb[:, t] for t in window}
        states = {t: [xs[t]] for t in window}
        for layer in model.layers:
            new = {}
            for t in window:
                q = F.linear(norm(xs[t]), layer.to_q.weight).reshape(B, H, D)
                entries = list(memory) + [(u, *key_value(xs[u])) for u in window if u < t]
                o = _attention(q, entries, bias_row(entries, t) if entries else None, D)
                y = xs[t] + layer.to_out(o.reshape(B, H * D))
                if layer.cross is not None:
                    c = layer.cross
                    cq = c.to_q(c.norm(y)).reshape(B, H, D)
                    ck, cv = c.to_kv(context).chunk(2, dim=-1)
                    ck, cv = ck.reshape(B, -1, H, D), cv.reshape(B, -1, H, D)
                    scores = torch.einsum("bhd,bshd->bhs", cq, ck) / math.sqrt(D)
                    if context_mask is not None:
                        scores = scores.masked_fill(~context_mask[:, None, :], float("-inf"))
                    co = torch.einsum("bhs,bshd->bhd", scores.softmax(-1), cv)
                    y = y + c.to_out(co.reshape(B, H * D))
                new[t] = y + _feedforward(layer, layer.ff_norm(y))
            xs = new
            for t in window:
                states[t].append(xs[t])
        for t in window:
            outputs.append(xs[t])
            if not M:  # no memory
                continue
            if model.keep_last_hidden:
                merged = xs[t]
            else:
                mix = model.layer_weight.softmax(dim=-1)  # (depth + 1,)
                merged = sum(w * s for w, s in zip(mix, states[t]))
            memory.append((t, *key_value(merged)))
        memory = memory[max(0, len(memory) - M) :] if M else []
    return model.to_logits(torch.stack(outputs, dim=1)), memory
