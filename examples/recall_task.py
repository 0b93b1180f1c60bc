"""Long-range recall: a windowed transformer against the Block-Recurrent and Feedback
Transformers, on a task whose answer lies further back than any attention window reaches.

Each sequence is ``k, n_1 .. n_D, ?`` : a key ``k`` from ``1..K``, ``D`` noise tokens from
``K+1..K+N`` and a query marker ``?``; the target at the last position is ``k``. All three
models see the sequence with the same receptive window ``W < D``:

- ``windowed``: a causal transformer with local attention over ``W`` positions
  (``recurrent_transformer.lm.RecurrentLM``, ``attention_type="local"``): the key is out of
  reach, so it can only guess (accuracy ``1/K``);
- ``block-recurrent``: blocks of ``W`` tokens, no Transformer-XL memories, one recurrent layer
  whose state vectors carry information from block to block (Hutchins et al. 2022,
  arXiv 2203.07852);
- ``feedback``: a memory of the last ``W`` steps, each slot mixing every layer of its step, so
  information can travel forward from step to step (Fan et al. 2021, arXiv 2002.09402).

    python examples/recall_task.py                 # a few minutes on 2 CPU cores
    python examples/recall_task.py --steps 50
"""

from __future__ import annotations

import argparse
import sys

import torch
import torch.nn.functional as F
from _common import markdown_table, train, write_report  # examples/ is on sys.path
from torch import Tensor, nn

MODELS = ("windowed", "block-recurrent", "feedback")


def recall_batch(batch: int, distance: int, keys: int, noise: int, generator):
    """Tokens ``(B, D + 2)`` and the key to recall ``(B,)``."""
    key = torch.randint(1, keys + 1, (batch, 1), generator=generator)
    filler = torch.randint(keys + 1, keys + noise + 1, (batch, distance), generator=generator)
    query = torch.full((batch, 1), keys + noise + 1)
    return torch.cat([key, filler, query], dim=1), key[:, 0]


def build(name: str, vocab: int, window: int, dim: int, depth: int) -> nn.Module:
    """The model ``name``; every one maps tokens ``(B, T)`` to logits ``(B, T, V)``."""
    heads = max(1, dim // 32)
    if name == "windowed":
        from recurrent_transformer.lm import RecurrentLM

        return RecurrentLM(
            num_tokens=vocab,
            n_layers=depth,
            n_heads=heads,
            query_dimensions=dim // heads,
            value_dimensions=dim // heads,
            attention_type="local",
            local_context=2 * window,
        )  # fmt: skip  (a centred band of 2W: with the causal mask, the last W positions)
    if name == "block-recurrent":
        from block_recurrent_transformer import BlockRecurrentTransformer

        return BlockRecurrentTransformer(
            num_tokens=vocab, dim=dim, depth=depth, dim_head=32, heads=heads,
            max_seq_len=4096, block_width=window, num_state_vectors=window,
            xl_memories_layers=(), recurrent_layers=(depth,),
        )  # fmt: skip
    if name == "feedback":
        from feedback_transformer import FeedbackTransformer

        return FeedbackTransformer(
            num_tokens=vocab, dim=dim, depth=depth, seq_len=4, mem_len=window, dim_head=32,
            heads=heads,
        )  # fmt: skip
    raise ValueError(f"model must be one of {MODELS}; got {name!r}")


def final_logits(model: nn.Module, tokens: Tensor) -> Tensor:
    """Logits ``(B, V)`` at the last position."""
    out = model(tokens)
    return (out[0] if isinstance(out, tuple) else out)[:, -1]


def loss_of(model: nn.Module, tokens: Tensor, key: Tensor) -> Tensor:
    return F.cross_entropy(final_logits(model, tokens), key)


@torch.no_grad()
def recall_accuracy(model: nn.Module, distance: int, keys: int, noise: int) -> float:
    model.eval()
    tokens, key = recall_batch(256, distance, keys, noise, torch.Generator().manual_seed(999))
    return (final_logits(model, tokens).argmax(-1) == key).float().mean().item()


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--distance", type=int, default=48, help="noise tokens D")
    parser.add_argument("--window", type=int, default=16, help="receptive window W < D")
    parser.add_argument("--keys", type=int, default=8)
    parser.add_argument("--noise", type=int, default=8)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--depth", type=int, default=2)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--output", help="also write the table here (Markdown)")
    args = parser.parse_args(argv)
    if args.window >= args.distance:
        parser.error(f"--window must be smaller than --distance; got {args.window}")
    vocab = args.keys + args.noise + 2
    results, rows = [], []
    for name in args.models:
        torch.manual_seed(0)
        model = build(name, vocab, args.window, args.dim, args.depth)
        stats = train(
            model,
            loss_of,
            lambda g: recall_batch(args.batch, args.distance, args.keys, args.noise, g),
            args.steps,
            args.lr,
        )
        accuracy = recall_accuracy(model, args.distance, args.keys, args.noise)
        results.append({"model": name, "accuracy": accuracy, **stats})
        rows.append(
            [name, f"{stats['loss']:.3f}", f"{accuracy:.1%}", f"{stats['ms_per_step']:.0f}"]
        )
        print(f"{name}: loss {stats['loss']:.3f}, recall accuracy {accuracy:.1%}", flush=True)
    table = markdown_table(["model", "final loss", "recall accuracy", "ms / training step"], rows)
    title = (
        f"Recall task: key at distance {args.distance + 1}, window W={args.window}, "
        f"{args.keys} keys, {args.depth} layers, d={args.dim}, batch {args.batch}, "
        f"{args.steps} steps (chance: {1 / args.keys:.1%})."
    )
    command = "python examples/recall_task.py " + " ".join(argv or sys.argv[1:])
    write_report(args.output, title, command.strip(), table)
    return results


if __name__ == "__main__":
    main()
