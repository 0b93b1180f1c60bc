"""Time attention implementations side by side: ``nox -s bench`` (or run directly).

Same process, same sizes, same thread count for every contender. Prints a table of
medians and ratios and writes it to ``docs/benchmarks/results.md`` for the docs site.

Contenders (causal attention over B=1, H=8, D=M=64, float32):
- ``full``: softmax attention with a causal mask (FullAttention);
- ``causal-linear``: CausalLinearAttention (numerator and normaliser) as shipped;
- ``cumsum``: the naive causal linear attention that keeps every prefix state (peak memory
  grows as N*D*M), for scale.
pytorch-fast-transformers joins this table with the compiled kernels (see the docs).
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from attention_core.attention import CausalLinearAttention, FullAttention
from attention_core.masking import LengthMask, TriangularCausalMask

ROOT = Path(__file__).resolve().parents[1]


def median_ms(fn, repeats: int) -> float:
    fn()  # warm up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def cumsum_causal_linear(q, k, v, eps=1e-6):
    phi_q = torch.nn.functional.elu(q) + 1
    phi_k = torch.nn.functional.elu(k) + 1
    states = torch.einsum("nlhe,nlhm->nlhem", phi_k, v).cumsum(1)
    numerator = torch.einsum("nlhe,nlhem->nlhm", phi_q, states)
    return numerator / (torch.einsum("nlhe,nlhe->nlh", phi_q, phi_k.cumsum(1))[..., None] + eps)


def contenders(N: int):
    full = FullAttention(attention_dropout=0.0)
    linear = CausalLinearAttention(64)
    mask, lengths = TriangularCausalMask(N), LengthMask(torch.tensor([N]), max_len=N)
    out = {
        "full": lambda q, k, v: full(q, k, v, mask, lengths, lengths),
        "causal-linear": lambda q, k, v: linear(q, k, v, mask, lengths, lengths),
    }
    if N <= 4096:
        out["cumsum"] = cumsum_causal_linear
    return out


def run(lengths: list[int], repeats: int, threads: int) -> list[dict]:
    torch.set_num_threads(threads)
    rows = []
    for N in lengths:
        for name, fn in contenders(N).items():
            if name == "full" and N > 8192:
                continue
            q, k, v = (torch.randn(1, N, 8, 64, requires_grad=True) for _ in range(3))

            def forward(fn=fn, q=q, k=k, v=v):
                with torch.no_grad():
                    fn(q, k, v)

            def forward_backward(fn=fn, q=q, k=k, v=v):
                fn(q, k, v).sum().backward()

            rows.append(
                {
                    "N": N,
                    "name": name,
                    "forward": median_ms(forward, repeats),
                    "forward+backward": median_ms(forward_backward, repeats),
                }
            )
            print(
                f"N={N:6d} {name:14s} fwd {rows[-1]['forward']:9.1f} ms   "
                f"fwd+bwd {rows[-1]['forward+backward']:9.1f} ms",
                flush=True,
            )
    return rows


def markdown(rows: list[dict], threads: int) -> str:
    lines = [
        f"Causal attention, B=1, H=8, D=M=64, float32, {threads} threads, "
        f"torch {torch.__version__}. Medians in ms; ratio = full / causal-linear.",
        "",
        "| N | contender | forward (ms) | forward+backward (ms) | fwd ratio vs causal-linear |",
        "| ---: | --- | ---: | ---: | ---: |",
    ]
    base = {r["N"]: r for r in rows if r["name"] == "causal-linear"}
    for r in rows:
        ratio = r["forward"] / base[r["N"]]["forward"]
        lines.append(
            f"| {r['N']} | {r['name']} | {r['forward']:.1f} | {r['forward+backward']:.1f} "
            f"| {ratio:.2f}x |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096, 16384])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--output", type=Path, default=ROOT / "docs" / "benchmarks" / "results.md")
    args = parser.parse_args()
    rows = run(args.lengths, args.repeats, args.threads)
    table = markdown(rows, args.threads)
    print(table)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(table)


if __name__ == "__main__":
    main()
