"""Which position scheme lets RecurrentLM read past its training window? Trains one small
model per scheme and attention on the demo's corpus, with the same steps, data and seed, then
prints bits per character at positions [0, W), [W, 2W) and [2W, 3W) of 64 random validation
windows of 3W bytes (W: the training window).

    python examples/position_schemes.py --out docs/benchmarks/position_schemes.md
    python examples/position_schemes.py --steps 300 --schemes token-shift sinusoidal

Steps, not seconds, make the schemes comparable on a shared machine; one thread is the
default because small models run fastest on one thread when other processes are busy.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import markdown_table, write_report
from _demo_data import load_corpus, random_windows

from recurrent_transformer.lm import POSITIONAL_ENCODINGS, RecurrentLM


def train(model: nn.Module, tokens, steps: int, batch: int, window: int, lr: float) -> None:
    """AdamW with a linear decay to 10% of ``lr``, on random windows (seed 0)."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    generator = torch.Generator().manual_seed(0)
    model.train()
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = lr * (1 - 0.9 * step / steps)
        seq = random_windows(tokens, batch, window, generator)
        loss = F.cross_entropy(model(seq[:, :-1]).flatten(0, 1), seq[:, 1:].flatten())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()


def bits_by_window(model: nn.Module, tokens, window: int, count: int = 64) -> list[float]:
    """Bits per character at positions [0, W), [W, 2W), [2W, 3W) of ``count`` windows."""
    seq = random_windows(tokens, count, 3 * window, torch.Generator().manual_seed(1))
    model.eval()
    with torch.no_grad():
        nats = torch.cat([F.cross_entropy(model(s[:, :-1]).transpose(1, 2), s[:, 1:],
                                          reduction="none") for s in seq.split(16)])  # fmt: skip
    bits = nats / math.log(2)
    return [bits[:, i * window : (i + 1) * window].mean().item() for i in range(3)]


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--attentions", nargs="+", default=["causal-linear", "full"])
    parser.add_argument("--schemes", nargs="+", default=list(POSITIONAL_ENCODINGS),
                        choices=POSITIONAL_ENCODINGS)  # fmt: skip
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--window", type=int, default=64)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--depth", type=int, default=2)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--max-bytes", type=int, default=4_000_000)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", help="also write the table here (Markdown)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    corpus = load_corpus(None, args.max_bytes)
    results = []
    for attention in args.attentions:
        for scheme in args.schemes:
            torch.manual_seed(0)
            model = RecurrentLM(256, n_layers=args.depth, n_heads=max(1, args.dim // 32),
                                query_dimensions=min(32, args.dim),
                                value_dimensions=min(32, args.dim), attention_type=attention,
                                positional_encoding=scheme)  # fmt: skip
            begin = time.perf_counter()
            train(model, corpus.train, args.steps, args.batch, args.window, args.lr)
            bits = bits_by_window(model, corpus.valid, args.window)
            results.append({"attention": attention, "scheme": scheme, "bits": bits,
                            "seconds": time.perf_counter() - begin})  # fmt: skip
            print(f"{attention} / {scheme}: {' '.join(f'{b:.3f}' for b in bits)}", flush=True)
    W = args.window
    header = ["attention", "positions", f"bits/char 0-{W - 1}", f"{W}-{2 * W - 1}",
              f"{2 * W}-{3 * W - 1}", "worst / inside"]  # fmt: skip
    rows = [[r["attention"], r["scheme"], *(f"{b:.3f}" for b in r["bits"]),
             f"{max(r['bits'][1:]) / r['bits'][0]:.2f}"] for r in results]  # fmt: skip
    title = (
        f"{args.steps} steps of batch {args.batch} on {W}-byte windows, dim {args.dim}, depth "
        f"{args.depth}, {args.threads} thread(s); bits per character of 64 validation windows "
        f"of {3 * W} bytes, by position."
    )
    shown = argv if argv is not None else sys.argv[1:]
    command = " ".join(["python examples/position_schemes.py", *shown])
    write_report(args.out, title, command, markdown_table(header, rows))
    return results


if __name__ == "__main__":
    main()
