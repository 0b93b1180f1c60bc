"""The local and sparse products on the CPU: attention-core's compiled kernels against its
plain-PyTorch reference and pytorch-fast-transformers 0.4. Run by ``nox -s bench`` or directly
(``--quick`` for a short run).

Same process, same inputs, same thread count (2 by default) for every contender; float32,
B=1, H=8, D=64:

- ``local_dot_product`` / ``local_weighted_average``: the two ops of LocalAttention with
  ``local_context`` 128, queries and keys ``(B, H, N, D)``;
- ``sparse_dot_product`` / ``sparse_weighted_average``: the same amount of work with 128
  random key indices per query (``topk (B, H, N, 128)``).

Each op is timed forward (no grad) and forward+backward (``out.sum().backward()``, -inf
slots set to zero first). Timings are medians of ``--repeats`` runs after a warm-up, the
contenders timed round-robin (A, B, C, A, B, C, ...) so that a shared machine's load hits
them alike; a contender whose warm-up call takes longer than ``--slow-ms`` is timed by that
one call (the plain-PyTorch reference at N=4096). Target: attention-core at least
2x faster than fast-transformers, forward and forward+backward. Medians from a shared
machine are noisy: read the ratios. Every contender runs each op once at N=256 before any
timing (lazy initialisation). The table goes to stdout and to ``docs/benchmarks/ops.md``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
H, D, WINDOW = 8, 64, 128
FORCE_REFERENCE_ENV = "ATTENTION_CORE_FORCE_REFERENCE"
CONTENDERS = ["attention-core", "plain PyTorch", "fast-transformers"]
OPS = [
    "local_dot_product",
    "local_weighted_average",
    "sparse_dot_product",
    "sparse_weighted_average",
]
MODES = ["forward", "forward+backward"]


def have_fast_transformers() -> bool:
    try:
        import fast_transformers.local_product
        import fast_transformers.sparse_product  # noqa: F401
    except ImportError:
        return False
    return True


def select(contender: str) -> None:
    """Kernel or forced plain-PyTorch path of attention-core (read at every call)."""
    os.environ[FORCE_REFERENCE_ENV] = "1" if contender == "plain PyTorch" else "0"


def modules(contender: str):
    if contender == "fast-transformers":
        from fast_transformers import local_product, sparse_product
    else:
        from attention_core import local_product, sparse_product
    return local_product, sparse_product


def make_call(op: str, contender: str, N: int, grad: bool):
    """A function of no arguments that runs ``op`` once and returns its output."""
    local, sparse = modules(contender)
    g = torch.Generator().manual_seed(0)

    def tensor(*shape):
        return torch.randn(*shape, generator=g).requires_grad_(grad)

    if op == "local_dot_product":
        Q, K = tensor(1, H, N, D), tensor(1, H, N, D)
        mask, lengths = torch.zeros(N, N), torch.tensor([N])
        return lambda: local.local_dot_product(Q, K, mask, lengths, WINDOW)
    if op == "local_weighted_average":
        A = torch.softmax(torch.randn(1, H, N, WINDOW, generator=g), -1).requires_grad_(grad)
        V = tensor(1, H, N, D)
        return lambda: local.local_weighted_average(A, V)
    topk = torch.randint(0, N, (1, H, N, WINDOW), generator=g)
    if op == "sparse_dot_product":
        Q, K = tensor(1, H, N, D), tensor(1, H, N, D)
        return lambda: sparse.sparse_dot_product(Q, K, topk)
    A = torch.softmax(torch.randn(1, H, N, WINDOW, generator=g), -1).requires_grad_(grad)
    V = tensor(1, H, N, D)
    return lambda: sparse.sparse_weighted_average(A, V, topk)


def step(fn, mode: str) -> None:
    if mode == "forward":
        with torch.no_grad():
            fn()
    else:
        out = fn()
        torch.where(torch.isinf(out), 0.0, out).sum().backward()


def interleaved_ms(fns: dict, repeats: int, slow_ms: float) -> dict:
    """Median ms of each function, timed round-robin (A, B, C, A, B, C, ...) after one
    warm-up call each, so that a shared machine's load hits every contender alike; a
    function whose warm-up call takes longer than ``slow_ms`` is timed by that call only."""
    times = {}
    for name, fn in fns.items():
        start = time.perf_counter()
        fn()
        times[name] = [(time.perf_counter() - start) * 1e3]
    fast = [name for name, t in times.items() if t[0] <= slow_ms]
    for name in fast:
        times[name] = []
    for _ in range(repeats):
        for name in fast:
            start = time.perf_counter()
            fns[name]()
            times[name].append((time.perf_counter() - start) * 1e3)
    return {name: statistics.median(t) for name, t in times.items()}


def timed_call(op: str, contender: str, N: int, mode: str):
    fn = make_call(op, contender, N, mode != "forward")

    def call():
        select(contender)
        step(fn, mode)

    return call


def run(args) -> list[dict]:
    torch.set_num_threads(args.threads)
    contenders = [c for c in CONTENDERS if c != "fast-transformers" or have_fast_transformers()]
    for contender in contenders:  # lazy initialisation (op registration, first calls)
        select(contender)
        for op in args.ops:
            for mode in MODES:
                step(make_call(op, contender, 256, mode != "forward"), mode)
    rows = []
    for op in args.ops:
        for N in args.lengths:
            row = {"op": op, "N": N}
            for mode in MODES:
                times = interleaved_ms(
                    {c: timed_call(op, c, N, mode) for c in contenders},
                    args.repeats,
                    args.slow_ms,
                )
                for contender in contenders:
                    row[contender, mode] = times[contender]
            rows.append(row)
            print(
                f"{op:24s} N={N:5d} "
                + "  ".join(
                    f"{c} {row[c, 'forward']:.1f}/{row[c, 'forward+backward']:.1f} ms"
                    for c in contenders
                ),
                flush=True,
            )
    select("attention-core")
    return rows


def fmt(x: float | None, spec: str, suffix: str = "") -> str:
    return "n/a" if x is None else format(x, spec) + suffix


def markdown(rows: list[dict], args) -> str:
    """Two tables: each contender's times, then attention-core's speed-ups over the others."""
    lines = [
        f"Local and sparse products on the CPU: B=1, H={H}, D={D}, local context / top-k "
        f"{WINDOW}, float32, {args.threads} threads, torch {torch.__version__}, medians of "
        f"{args.repeats} runs. Command: `python benchmarks/bench_ops.py"
        f"{''.join(f' {a}' for a in sys.argv[1:])}`.",
        "",
        "Time in ms, forward / forward+backward:",
        "",
        "| op | N | attention-core | plain PyTorch | fast-transformers |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    speedups = [
        "",
        "Speed-up of attention-core = the other contender's time / attention-core's time:",
        "",
        "| op | N | vs plain fwd | vs plain fwd+bwd | vs fast-transformers fwd "
        "| vs fast-transformers fwd+bwd |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        ours = {m: r["attention-core", m] for m in MODES}
        cells = []
        for contender in CONTENDERS:
            if (contender, "forward") in r:
                cells.append(
                    f"{r[contender, 'forward']:.1f} / {r[contender, 'forward+backward']:.1f}"
                )
            else:
                cells.append("n/a")
        ratios = []
        for contender in ("plain PyTorch", "fast-transformers"):
            for m in MODES:
                other = r.get((contender, m))
                ratios.append(fmt(None if other is None else other / ours[m], ".1f", "x"))
        lines.append(f"| {r['op']} | {r['N']} | " + " | ".join(cells) + " |")
        speedups.append(f"| {r['op']} | {r['N']} | " + " | ".join(ratios) + " |")
    return "\n".join(lines + speedups) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096])
    parser.add_argument("--ops", nargs="+", default=OPS, choices=OPS)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--slow-ms", type=float, default=5000.0, help="time slower contenders by one call"
    )
    parser.add_argument("--quick", action="store_true", help="3 repeats, slow above 1 s")
    parser.add_argument("--output", type=Path, default=ROOT / "docs" / "benchmarks" / "ops.md")
    args = parser.parse_args()
    if args.quick:
        args.repeats, args.slow_ms = 3, 1000.0
    if not have_fast_transformers():
        print(
            "pytorch-fast-transformers is not installed: timing attention-core alone",
            file=sys.stderr,
        )
    table = markdown(run(args), args)
    print()
    print(table)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(table)


if __name__ == "__main__":
    main()
