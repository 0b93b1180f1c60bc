"""Whole-model training step: a causal-linear encoder against fast-transformers and its floor.

Run with ``nox -s bench`` or directly: ``python benchmarks/bench_training.py [--quick]``.
Writes the table to ``docs/benchmarks/training.md`` and the numbers to ``training.json``.

What a user of either library runs to train a causal linear-attention model: the
``TransformerEncoderBuilder`` encoder with ``attention_type="causal-linear"`` and a
``TriangularCausalMask``, forward and backward of a loss over its output (dropout off, float32,
same thread count), in two sizes:

- ``small``: 4 layers, 4 heads of 64 (d_model 256), feed-forward 1024, batch 8 x 512 tokens;
- ``base``: 4 layers, 8 heads of 64 (d_model 512), feed-forward 2048, batch 4 x 1024 tokens.

The contenders, timed in turns in one process (medians):

- ``attention-core``: this project's encoder;
- ``fast-transformers``: pytorch-fast-transformers 0.4.0's encoder with the same weights
  (its ``state_dict`` is loaded into ours; the outputs are compared before timing);
- ``dense products``: the floor, the model's 24 ``nn.Linear`` products alone (q, k, v, out,
  and the two feed-forward products of each layer, on inputs of the shapes they see in the
  model), forward and one backward through all of them. Everything else a step does (the
  attention, layer norms, activation, residual adds, the loss) is the distance to this floor.

fast-transformers is imported if it is installed; without it only our rows are reported.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from timing import interleaved_medians
from torch import Tensor, nn

from attention_core.builders import TransformerEncoderBuilder
from attention_core.masking import TriangularCausalMask

ROOT = Path(__file__).resolve().parents[1]
SIZES = {
    "small": dict(heads=4, ff=1024, batch=8, length=512),
    "base": dict(heads=8, ff=2048, batch=4, length=1024),
}
LAYERS, HEAD_DIM = 4, 64


def import_fast_transformers():
    """fast-transformers' builder and causal mask, or ``None`` when it cannot be imported."""
    try:
        from fast_transformers.builders import TransformerEncoderBuilder as FTBuilder
        from fast_transformers.masking import TriangularCausalMask as FTMask
    except ImportError:
        return None
    return FTBuilder, FTMask


def build(Builder, size: dict) -> nn.Module:
    return Builder.from_kwargs(
        n_layers=LAYERS, n_heads=size["heads"], query_dimensions=HEAD_DIM,
        value_dimensions=HEAD_DIM, feed_forward_dimensions=size["ff"],
        attention_type="causal-linear", dropout=0.0, attention_dropout=0.0,
    ).get().train()  # fmt: skip


def training_step(model: nn.Module, x: Tensor, mask) -> None:
    """Forward and backward of a loss over the encoder's output; gradients are dropped."""
    model.zero_grad(set_to_none=True)
    model(x, attn_mask=mask).square().mean().backward()


class DenseProducts:
    """The model's ``nn.Linear`` products alone: forward, then one backward through all."""

    def __init__(self, model: nn.Module, rows: int):
        self.linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
        self.inputs = [torch.randn(rows, m.in_features, requires_grad=True) for m in self.linears]
        self.grads = [torch.randn(rows, m.out_features) for m in self.linears]

    def __call__(self) -> None:
        for m in self.linears:
            m.zero_grad(set_to_none=True)
        outputs = [m(x) for m, x in zip(self.linears, self.inputs)]
        torch.autograd.backward(outputs, self.grads)

    def gflop(self) -> float:
        """Forward and backward floating-point operations (3 products of 2 x rows x in x out)."""
        rows = self.inputs[0].shape[0]
        return sum(6 * rows * m.in_features * m.out_features for m in self.linears) / 1e9


def measure(name: str, size: dict, peer, repeats: int) -> list[dict]:
    d_model = size["heads"] * HEAD_DIM
    torch.manual_seed(0)
    ours = build(TransformerEncoderBuilder, size)
    x = torch.randn(size["batch"], size["length"], d_model)
    mask = TriangularCausalMask(size["length"])
    floor = DenseProducts(ours, size["batch"] * size["length"])
    calls = {"attention-core": lambda: training_step(ours, x, mask)}
    if peer is not None:
        FTBuilder, FTMask = peer
        theirs = build(FTBuilder, size)
        ours.load_state_dict(theirs.state_dict())
        ft_mask = FTMask(size["length"])
        with torch.no_grad():
            gap = (ours(x, attn_mask=mask) - theirs(x, attn_mask=ft_mask)).abs().max().item()
        print(f"{name}: outputs agree to {gap:.1e}", flush=True)
        calls["fast-transformers"] = lambda: training_step(theirs, x, ft_mask)
    calls["dense products"] = floor
    times = interleaved_medians(calls, repeats)
    tokens = size["batch"] * size["length"]
    rows = []
    for contender, seconds in times.items():
        row = dict(size=name, contender=contender, ms=seconds * 1e3, tokens_per_s=tokens / seconds)
        row["vs_peer"] = times.get("fast-transformers", float("nan")) / seconds
        row["vs_floor"] = seconds / times["dense products"]
        if contender == "dense products":
            row["gflops"] = floor.gflop() / seconds
        rows.append(row)
        print(f"{name:6s} {contender:18s} {seconds * 1e3:9.1f} ms", flush=True)
    return rows


def markdown(rows: list[dict], args) -> str:
    lines = [
        f"Training step of a 4-layer causal-linear encoder (`TransformerEncoderBuilder`, "
        f"`TriangularCausalMask`), forward and backward, float32, {args.threads} threads, "
        f"torch {args.torch}, medians of {args.repeats} steps timed in turns. Command: "
        f"`python benchmarks/bench_training.py{args.command}`.",
        "",
        "small: d_model 256 (4 heads of 64), feed-forward 1024, batch 8 x 512 tokens; "
        "base: d_model 512 (8 heads of 64), feed-forward 2048, batch 4 x 1024 tokens. "
        "Speed-up = fast-transformers' time / this row's time; vs floor = this row's time / "
        "the time of the model's dense products alone.",
        "",
        "| model | contender | ms / step | tokens/s | speed-up | vs floor |",
        "| --- | --- | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        speedup = "n/a" if r["vs_peer"] != r["vs_peer"] else f"{r['vs_peer']:.2f}x"
        lines.append(
            f"| {r['size']} | {r['contender']} | {r['ms']:.1f} | {r['tokens_per_s']:,.0f} | "
            f"{speedup} | {r['vs_floor']:.2f}x |"
        )
    rates = [f"{r['size']} {r['gflops']:.0f}" for r in rows if "gflops" in r]
    lines += ["", f"The dense products alone run at {', '.join(rates)} GFLOP/s.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    parser.add_argument("--quick", action="store_true", help="the small model, 3 steps")
    parser.add_argument("--output", type=Path, default=ROOT / "docs" / "benchmarks" / "training.md")
    args = parser.parse_args(argv)
    if args.quick:
        args.sizes, args.repeats = ["small"], 3
    args.torch = torch.__version__
    args.command = "".join(f" {a}" for a in (sys.argv[1:] if argv is None else argv))
    torch.set_num_threads(args.threads)
    peer = import_fast_transformers()
    if peer is None:
        print("pytorch-fast-transformers is not installed: its rows are skipped", file=sys.stderr)
    rows = [r for name in args.sizes for r in measure(name, SIZES[name], peer, args.repeats)]
    table = markdown(rows, args)
    print(table)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(table)
    keep = {k: getattr(args, k) for k in ("threads", "repeats", "torch", "command")}
    args.output.with_suffix(".json").write_text(json.dumps({"args": keep, "rows": rows}) + "\n")


if __name__ == "__main__":
    main()
