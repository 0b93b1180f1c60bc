"""The synthetic copy task of "Transformers are RNNs" (Katharopoulos et al. 2020,
arXiv 2006.16236, section 4.1) at a small scale: full, causal-linear and clustered attention.

Each sequence is ``0, x_1 .. x_L, 0, x_1 .. x_L`` with symbols ``x_i`` drawn from ``1..S``; a
causal transformer learns to predict every next token, and is scored on the copied half (the
first half is random, so only the copy is learnable). Every attention trains the same model
(builder settings, steps, batches, seed); only ``attention_type`` changes. Clustered attention
here is ``causal-improved-clustered``, the clustered attention that accepts a causal mask.

    python examples/copy_task.py                       # about 3 minutes on 2 CPU cores
    python examples/copy_task.py --steps 50 --length 16
"""

from __future__ import annotations

import argparse
import sys

import torch
import torch.nn.functional as F
from _common import markdown_table, train, write_report  # examples/ is on sys.path
from torch import Tensor, nn

from attention_core.builders import TransformerEncoderBuilder
from attention_core.masking import TriangularCausalMask

ATTENTIONS = {
    "full": {},
    "causal-linear": {},
    "causal-improved-clustered": {"clusters": 8, "topk": 8},
}


class CopyModel(nn.Module):
    """Token and learned position embeddings, a causal encoder, a linear head.

    Shapes: tokens ``(B, T)`` int64 -> logits ``(B, T, V)``.
    """

    def __init__(self, vocab: int, length: int, attention_type: str, dim: int, layers: int):
        super().__init__()
        heads = 4
        self.embed = nn.Embedding(vocab, dim)
        self.position = nn.Parameter(torch.randn(length, dim) * 0.02)
        self.encoder = TransformerEncoderBuilder.from_kwargs(
            attention_type=attention_type, n_layers=layers, n_heads=heads,
            query_dimensions=dim // heads, value_dimensions=dim // heads,
            feed_forward_dimensions=4 * dim, dropout=0.0, attention_dropout=0.0,
            **ATTENTIONS[attention_type],
        ).get()  # fmt: skip
        self.head = nn.Linear(dim, vocab)

    def forward(self, tokens: Tensor) -> Tensor:
        T = tokens.shape[1]
        x = self.embed(tokens) + self.position[:T]
        return self.head(self.encoder(x, attn_mask=TriangularCausalMask(T)))


def copy_batch(batch: int, length: int, symbols: int, generator) -> tuple[Tensor, Tensor]:
    """Inputs ``(B, 2L + 1)`` and next-token targets ``(B, 2L + 1)`` (``-100`` outside the
    copied half)."""
    x = torch.randint(1, symbols + 1, (batch, length), generator=generator)
    zero = torch.zeros(batch, 1, dtype=torch.long)
    seq = torch.cat([zero, x, zero, x], dim=1)
    targets = seq[:, 1:].clone()
    targets[:, : length + 1] = -100  # the random first half and the separator are not scored
    return seq[:, :-1], targets


def loss_of(model: nn.Module, inputs: Tensor, targets: Tensor) -> Tensor:
    return F.cross_entropy(model(inputs).flatten(0, 1), targets.flatten(), ignore_index=-100)


@torch.no_grad()
def copy_accuracy(model: nn.Module, length: int, symbols: int) -> float:
    """Per-symbol accuracy of teacher-forced predictions on the copied half (512 sequences)."""
    model.eval()
    inputs, targets = copy_batch(512, length, symbols, torch.Generator().manual_seed(12345))
    predictions = model(inputs).argmax(-1)
    scored = targets != -100
    return (predictions[scored] == targets[scored]).float().mean().item()


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--attentions", nargs="+", default=list(ATTENTIONS), choices=ATTENTIONS)
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--length", type=int, default=32, help="symbols to copy (L)")
    parser.add_argument("--symbols", type=int, default=10)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--output", help="also write the table here (Markdown)")
    args = parser.parse_args(argv)
    results, rows = [], []
    for attention in args.attentions:
        torch.manual_seed(0)
        model = CopyModel(args.symbols + 1, 2 * args.length + 1, attention, args.dim, args.layers)
        stats = train(
            model,
            loss_of,
            lambda g: copy_batch(args.batch, args.length, args.symbols, g),
            args.steps,
            args.lr,
        )
        accuracy = copy_accuracy(model, args.length, args.symbols)
        results.append({"attention": attention, "accuracy": accuracy, **stats})
        rows.append(
            [attention, f"{stats['loss']:.3f}", f"{accuracy:.1%}", f"{stats['ms_per_step']:.1f}"]
        )
        print(f"{attention}: loss {stats['loss']:.3f}, copy accuracy {accuracy:.1%}", flush=True)
    table = markdown_table(["attention", "final loss", "copy accuracy", "ms / training step"], rows)
    title = (
        f"Copy task: L={args.length} symbols from {args.symbols}, {args.layers} layers, "
        f"d={args.dim}, batch {args.batch}, {args.steps} steps, torch threads: "
        f"{torch.get_num_threads()} (chance: {1 / args.symbols:.0%})."
    )
    command = "python examples/copy_task.py " + " ".join(argv or sys.argv[1:])
    write_report(args.output, title, command.strip(), table)
    return results


if __name__ == "__main__":
    main()
