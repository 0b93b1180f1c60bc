"""Causal linear attention on the CPU: attention-core's compiled kernel against
pytorch-fast-transformers 0.4 and the plain-PyTorch (chunked) form. Run by ``nox -s bench``
or directly (``--quick`` for a short run).

Same process, same inputs, same thread count for every contender. Two workloads, B=1, H=8,
D=M=64, float32 by default:

- ``attention``: the whole CausalLinearAttention module (feature map, numerator and
  normaliser), inputs ``(B, N, H, D)``;
- ``numerator``: the bare causal dot product ``(B, H, N, D)``.

For scale, the ``attention`` workload also times softmax attention with a causal mask
(attention-core's FullAttention, quadratic in N) up to ``--full-max``.

Timings are medians of ``--repeats`` runs after a warm-up, the contenders of one row timed
round-robin (A, B, C, A, B, C, ...) so that a shared machine's load hits them alike, with
Python's cyclic garbage collector paused while they run (as ``timeit`` does: a collection
that happens to fall into one contender's call is not that contender's cost). The layer is
also timed against its bare numerator op (contiguous inputs), interleaved likewise, and a
last table sets the results against the project's performance targets.

Both the layer and the bare op return a fresh ``(B, N, H, D)`` tensor. From 32 MiB on
(N=16384 here) glibc may serve such a block with a fresh ``mmap`` and return it to the system
when it is freed, so that the call's output arrives as untouched pages that the kernel zeroes
on first write; whether it does depends on the calls before (glibc moves its threshold), so
one call of a pair may pay it and the other not. This is no cost of the kernel: any op that
returns a tensor that large pays it, a GEMM into a fresh output too (``--fresh-pages`` times a
``(N H x 64) @ (64 x 64)`` GEMM, fresh and into a kept output, beside the numerator; on one
loaded core at N=16384 the GEMM took 22 ms fresh against 11 ms into a kept output, the
numerator 29 ms, and 20 ms with huge pages). The layer-against-op timing and the GEMM rate
are therefore also measured in a child process run with ``GLIBC_TUNABLES`` that keep every
block on the heap, where a freed output is reused and neither call pays fresh pages; the
targets table gives both. PyTorch's own ``THP_MEM_ALLOC_ENABLE=1`` (huge pages for large CPU
allocations) removes most of that cost for every op alike. Peak memory is measured per
contender in a fresh subprocess: the peak resident set during one call minus the resident set
before it (Linux ``VmHWM`` after resetting it), so it counts every allocation made by the
call: outputs, saved tensors, gradients and workspace. GFLOP/s use the
recurrence's own operation count, ``4 N H D M`` forward and ``14 N H D M`` forward+backward
(the numerator; the normaliser adds ``O(N H D)``), and are also given as a fraction of a
float32 GEMM timed here with the same threads. Medians from a shared machine are noisy: read
the ratios.

The tables go to stdout and to ``docs/benchmarks/causal_linear.md``, the numbers to
``causal_linear.json`` beside it; ``--render`` rewrites the tables from that JSON alone.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
H, D = 8, 64
FORCE_REFERENCE_ENV = "ATTENTION_CORE_FORCE_REFERENCE"
CONTENDERS = ["attention-core", "plain PyTorch", "fast-transformers", "full softmax"]
MODES = ["forward", "forward+backward"]


def have_fast_transformers() -> bool:
    try:
        import fast_transformers.causal_product  # noqa: F401
    except ImportError:
        return False
    return True


# ---------------------------------------------------------------------------------------
# contenders
# ---------------------------------------------------------------------------------------


def make_call(workload: str, contender: str, N: int, dtype: torch.dtype):
    """A function of (q, k, v) for one contender, and the input shape it takes."""
    if contender == "full softmax":  # attention-core's FullAttention with a causal mask
        from attention_core.attention import FullAttention
        from attention_core.masking import LengthMask, TriangularCausalMask

        full = FullAttention(attention_dropout=0.0)
        mask, lengths = TriangularCausalMask(N), LengthMask(torch.tensor([N]), max_len=N)
        return (lambda q, k, v: full(q, k, v, mask, lengths, lengths)), (1, N, H, D)
    if contender == "fast-transformers":
        from fast_transformers.attention import CausalLinearAttention
        from fast_transformers.causal_product import causal_dot_product
        from fast_transformers.masking import LengthMask, TriangularCausalMask
    else:
        from attention_core.attention import CausalLinearAttention
        from attention_core.causal_product import causal_dot_product
        from attention_core.masking import LengthMask, TriangularCausalMask
    if workload == "numerator":
        return causal_dot_product, (1, H, N, D)
    attention = CausalLinearAttention(D)
    mask, lengths = TriangularCausalMask(N), LengthMask(torch.tensor([N]), max_len=N)
    return (lambda q, k, v: attention(q, k, v, mask, lengths, lengths)), (1, N, H, D)


def make_inputs(shape: tuple[int, ...], dtype: torch.dtype, grad: bool):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(shape, generator=g, dtype=dtype, requires_grad=grad) for _ in range(3)]


def step(fn, q, k, v, mode: str) -> None:
    if mode == "forward":
        with torch.no_grad():
            fn(q, k, v)
    else:
        fn(q, k, v).sum().backward()


def select(contender: str) -> None:
    """Kernel or forced plain-PyTorch path of attention-core (read at every call)."""
    os.environ[FORCE_REFERENCE_ENV] = "1" if contender == "plain PyTorch" else "0"


def median_ms(fn, repeats: int) -> float:
    fn()  # warm up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def gemm_gflops(threads: int, dtype: torch.dtype, size: int = 2048) -> float:
    torch.set_num_threads(threads)
    a, b = (torch.randn(size, size, dtype=dtype) for _ in range(2))
    ms = median_ms(lambda: a @ b, 7)
    return 2 * size**3 / ms / 1e6


# ---------------------------------------------------------------------------------------
# peak memory: one subprocess per measurement
# ---------------------------------------------------------------------------------------


def measure_peak(workload: str, contender: str, N: int, mode: str, dtype: str, threads: int):
    """Run in a child: print the growth of the peak RSS (MiB) caused by one call."""
    torch.set_num_threads(threads)
    select(contender)
    dtype = getattr(torch, dtype)
    small, small_shape = make_call(workload, contender, 64, dtype)  # lazy initialisation
    step(small, *make_inputs(small_shape, dtype, mode != "forward"), mode)
    fn, shape = make_call(workload, contender, N, dtype)
    q, k, v = make_inputs(shape, dtype, mode != "forward")
    before = reset_peak_rss_kib()
    step(fn, q, k, v, mode)
    print(json.dumps({"peak_mib": (peak_rss_kib() - before) / 1024}))


def _status_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def reset_peak_rss_kib() -> int:
    """Reset the peak resident set size (Linux) and return the current one, in KiB. Without
    /proc, fall back to ru_maxrss (which also counts the peak before this point)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return _status_kib("VmRSS")
    except (OSError, TypeError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def peak_rss_kib() -> int:
    peak = _status_kib("VmHWM")
    return peak if peak is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def peak_mib(workload, contender, N, mode, dtype, threads) -> float | None:
    command = [
        sys.executable, __file__, "--child", workload, contender, str(N), mode,
        str(dtype).removeprefix("torch."), str(threads),
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        print(result.stderr[-2000:], file=sys.stderr)
        return None
    return json.loads(result.stdout.strip().splitlines()[-1])["peak_mib"]


# ---------------------------------------------------------------------------------------
# the table
# ---------------------------------------------------------------------------------------


def interleaved_ms(fns: dict, repeats: int) -> dict:
    """Median ms of each function, timed round-robin (A, B, C, A, B, C, ...) after one
    warm-up call each, so that the load of a shared machine hits every contender alike; the
    cyclic garbage collector is paused meanwhile (as ``timeit`` does)."""
    for fn in fns.values():
        fn()
    times = {name: [] for name in fns}
    was_enabled = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        for _ in range(repeats):
            for name, fn in fns.items():
                start = time.perf_counter()
                fn()
                times[name].append((time.perf_counter() - start) * 1e3)
    finally:
        if was_enabled:
            gc.enable()
    return {name: statistics.median(t) for name, t in times.items()}


def fill_calls(N: int, dtype: torch.dtype) -> dict:
    """Filling a fresh ``(1, N, H, D)`` tensor and filling a kept one: their difference is
    the cost of the fresh pages of an output of that size (see the module docstring)."""
    kept = torch.empty(1, N, H, D, dtype=dtype)
    return {
        "fill fresh": lambda: torch.empty(1, N, H, D, dtype=dtype).fill_(1.0),
        "fill kept": lambda: kept.fill_(1.0),
    }


def timed_call(workload, contender, N, dtype, mode):
    """A function of no arguments: one call of ``contender`` in ``mode``."""
    fn, shape = make_call(workload, contender, N, dtype)
    q, k, v = make_inputs(shape, dtype, mode != "forward")

    def call():
        select(contender)
        step(fn, q, k, v, mode)

    return call


def run(args) -> tuple[list[dict], float]:
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    gemm = gemm_gflops(args.threads, dtype)
    print(f"float32 GEMM (2048^3, {args.threads} threads): {gemm:.0f} GFLOP/s", flush=True)
    # fast-transformers' CPU kernel takes float32 only
    peer = have_fast_transformers() and dtype == torch.float32
    contenders = [c for c in CONTENDERS if c != "fast-transformers" or peer]
    rows = []
    for workload in args.workloads:
        for N in args.lengths:
            chosen = [
                c
                for c in contenders
                if not (c == "plain PyTorch" and args.reference_max < N)
                and not (c == "full softmax" and (workload != "attention" or args.full_max < N))
            ]
            times = {
                mode: interleaved_ms(
                    {c: timed_call(workload, c, N, dtype, mode) for c in chosen}, args.repeats
                )
                for mode in MODES
            }
            for contender in chosen:
                row = {"workload": workload, "N": N, "contender": contender}
                for mode in MODES:
                    row[mode] = times[mode][contender]
                    row[f"{mode} MiB"] = (
                        None
                        if args.no_memory
                        else peak_mib(workload, contender, N, mode, dtype, args.threads)
                    )
                rows.append(row)
                print(
                    f"{workload:9s} N={N:6d} {contender:18s} fwd {row['forward']:8.1f} ms  "
                    f"fwd+bwd {row['forward+backward']:8.1f} ms  peak "
                    f"{row['forward MiB']} / {row['forward+backward MiB']} MiB",
                    flush=True,
                )
    select("attention-core")
    return rows, gemm


LAYER_REPEATS = 21


def layer_against_bare_op(args) -> list[dict]:
    """attention-core's whole CausalLinearAttention layer ((B, N, H, D) inputs) against its
    bare numerator op on contiguous (B, H, N, D) inputs, interleaved: the layer's overhead
    (feature map, normaliser, layout). At least LAYER_REPEATS pairs: a ratio of two medians
    of 7 moved by 0.3 between runs."""
    dtype = getattr(torch, args.dtype)
    select("attention-core")
    rows = []
    for N in args.lengths:
        row = {"N": N}
        for mode in MODES:
            calls = {
                w: timed_call(w, "attention-core", N, dtype, mode)
                for w in ("attention", "numerator")
            }
            times = interleaved_ms(calls, max(args.repeats, LAYER_REPEATS))
            row[mode] = times["attention"] / times["numerator"]
            if mode == "forward":
                row["numerator forward ms"] = times["numerator"]
        rows.append(row)
        print(
            f"layer / bare numerator N={N:6d} fwd {row['forward']:.2f}x  "
            f"fwd+bwd {row['forward+backward']:.2f}x  (numerator forward "
            f"{row['numerator forward ms']:.2f} ms)",
            flush=True,
        )
    return rows


# glibc serves blocks from 32 MiB on with a fresh mmap whose pages the system zeroes on first
# write; these tunables keep every block on the heap, where a freed output is reused
HEAP_OUTPUTS = "glibc.malloc.mmap_threshold=4294967295:glibc.malloc.trim_threshold=4294967295"


def layer_against_bare_op_on_heap(args) -> dict | None:
    """`layer_against_bare_op` and the GEMM rate again in a child process whose large outputs
    are reused from the heap (`HEAP_OUTPUTS`), so that neither call pays fresh pages: the
    kernels' own ratio. None where the child fails (not glibc, for one)."""
    command = [
        sys.executable, __file__, "--layer-on-heap", "--lengths", *map(str, args.lengths),
        "--repeats", str(args.repeats), "--threads", str(args.threads), "--dtype", args.dtype,
    ]  # fmt: skip
    env = {**os.environ, "GLIBC_TUNABLES": HEAP_OUTPUTS}
    result = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        print(f"the layer/op run on the heap failed: {result.stderr[-500:]}", file=sys.stderr)
        return None
    return json.loads(result.stdout.strip().splitlines()[-1])


def fresh_page_calls(N: int, dtype: torch.dtype) -> dict:
    """The calls of `fresh_pages` for one N."""
    from attention_core.causal_product import causal_dot_product

    a, b = torch.randn(N * H, D, dtype=dtype), torch.randn(D, D, dtype=dtype)
    kept = torch.empty(N * H, D, dtype=dtype)
    q, k, v = make_inputs((1, H, N, D), dtype, False)
    return {
        **fill_calls(N, dtype),
        "GEMM fresh": lambda: torch.mm(a, b),
        "GEMM kept": lambda: torch.mm(a, b, out=kept),
        "numerator": lambda: causal_dot_product(q, k, v),
    }


def fresh_pages(args) -> None:
    """Print what a fresh output costs against a kept one, per N: filling it, and a GEMM
    with the numerator's output shape ``(N H x D) @ (D x D)``; the numerator op beside them
    (it always returns a fresh output). Run again with ``THP_MEM_ALLOC_ENABLE=1`` to see
    PyTorch's huge pages remove most of the difference."""
    dtype = getattr(torch, args.dtype)
    torch.set_num_threads(args.threads)
    for N in args.lengths:
        with torch.no_grad():
            times = interleaved_ms(fresh_page_calls(N, dtype), args.repeats)
        print(
            f"N={N:6d} output {N * H * D * dtype.itemsize / 2**20:.0f} MiB: "
            + ", ".join(f"{name} {ms:.2f} ms" for name, ms in times.items()),
            flush=True,
        )


def fmt(x, spec: str) -> str:
    return "n/a" if x is None else format(x, spec)


TARGETS = (
    "attention forward: speed-up over fast-transformers >= 6x",
    "attention forward+backward: speed-up over fast-transformers >= 5x",
    "attention peak memory fwd / fwd+bwd vs fast-transformers <= 1x",
    "layer / bare numerator op, forward <= 1.3x",
    "layer / bare numerator op, forward+backward <= 1.3x",
    "the same two, outputs reused from the heap",
    "numerator forward, share of the GEMM rate >= 50%",
    "the same, outputs reused from the heap",
)


def targets(rows: list[dict], layer: list[dict], gemm: float, heap: dict | None) -> list[str]:
    """The project's performance targets, with what this run reached: one row per target,
    one column per N (ratios; a shared machine is noisy). `heap` holds the layer/op ratios
    and the GEMM rate of the run whose outputs were reused from the heap."""
    get = {(r["workload"], r["N"], r["contender"]): r for r in rows}
    on_heap = {entry["N"]: entry for entry in (heap or {}).get("layer", [])}
    columns = []
    for entry in layer:
        N = entry["N"]
        ours = get.get(("attention", N, "attention-core"))
        peer = get.get(("attention", N, "fast-transformers"))
        numerator = get.get(("numerator", N, "attention-core"))
        speed = ["n/a", "n/a"]
        memory = "n/a"
        if ours and peer:
            speed = [f"{peer[m] / ours[m]:.1f}x" for m in MODES]
            peaks = [(ours[f"{m} MiB"], peer[f"{m} MiB"]) for m in MODES]
            if all(a is not None and b for a, b in peaks):
                memory = " / ".join(f"{a / b:.2f}x" for a, b in peaks)
        work = 4 * H * N * D * D / 1e6  # GFLOP * 1e3
        rate = "n/a"
        if numerator:
            rate = f"{work / numerator['forward'] / gemm:.0%}"
        layer_cells = [f"{entry[m]:.2f}x" for m in MODES]
        heap_ratios, heap_rate = "n/a", "n/a"
        if N in on_heap:
            kept = on_heap[N]
            heap_ratios = " / ".join(f"{kept[m]:.2f}x" for m in MODES)
            heap_rate = f"{work / kept['numerator forward ms'] / heap['gemm']:.0%}"
        columns.append([*speed, memory, *layer_cells, heap_ratios, rate, heap_rate])
    lines = [
        "",
        "Against the project's performance targets (the layer is `CausalLinearAttention`, the "
        "bare op its numerator on contiguous inputs, timed interleaved). From N=16384 on an "
        "output is 32 MiB, which glibc serves with a fresh mapping whose pages the system "
        "zeroes on first write, on some calls and not others: a cost of any op that returns a "
        "tensor that large, which the reference GEMM's reused 16 MiB output does not pay. The "
        'rows "outputs reused from the heap" repeat the layer/op timing and the GEMM in a '
        f"process run with `GLIBC_TUNABLES={HEAP_OUTPUTS}`, where neither call pays it "
        "(forward / forward+backward).",
        "",
        "| target | " + " | ".join(f"N={entry['N']}" for entry in layer) + " |",
        "| --- |" + " ---: |" * len(layer),
    ]
    for i, target in enumerate(TARGETS):
        lines.append(f"| {target} | " + " | ".join(c[i] for c in columns) + " |")
    return lines


def markdown(
    rows: list[dict], gemm: float, args, layer: list[dict] | None = None, heap: dict | None = None
) -> str:
    """The tables: times and speed-ups, then peak memory and GFLOP/s, then the targets."""
    lines = [
        f"Causal linear attention on the CPU: B=1, H={H}, D=M={D}, {args.dtype}, "
        f"{args.threads} threads, torch {args.torch}, medians of {args.repeats} runs. "
        f"Command: `python benchmarks/bench_causal_linear.py{args.command}`.",
        "",
        "Time in ms; speed-up = fast-transformers' time / this row's time.",
        "",
        "| workload | N | contender | forward | fwd+bwd | speed-up fwd | speed-up fwd+bwd |",
        "| --- | ---: | --- | ---: | ---: | ---: | ---: |",
    ]
    memory = [
        "",
        f"Peak = growth of the peak RSS during one call (MiB). GFLOP/s count the recurrence's "
        f"4·N·H·D·M (forward) and 14·N·H·D·M (forward+backward) operations, in brackets as a "
        f"share of the {args.dtype} GEMM rate measured here ({gemm:.0f} GFLOP/s).",
        "",
        "| workload | N | contender | peak fwd | peak fwd+bwd | GFLOP/s fwd | GFLOP/s fwd+bwd |",
        "| --- | ---: | --- | ---: | ---: | ---: | ---: |",
    ]
    peer = {(r["workload"], r["N"]): r for r in rows if r["contender"] == "fast-transformers"}
    for r in rows:
        base = peer.get((r["workload"], r["N"]))
        work = H * r["N"] * D * D / 1e6  # per (flop count / 1e9) / ms
        cells = ["n/a", "n/a"]  # the recurrence's operation count means nothing for softmax
        if r["contender"] != "full softmax":
            cells = []
            for mode, ops in (("forward", 4), ("forward+backward", 14)):
                rate = ops * work / r[mode]
                cells.append(f"{rate:.0f} ({rate / gemm:.0%})")
        speed = [fmt(base[m] / r[m] if base else None, ".1f") + "x" * bool(base) for m in MODES]
        key = f"| {r['workload']} | {r['N']} | {r['contender']} "
        lines.append(
            key + f"| {r['forward']:.1f} | {r['forward+backward']:.1f} | {speed[0]} | {speed[1]} |"
        )
        memory.append(
            key + f"| {fmt(r['forward MiB'], '.0f')} | {fmt(r['forward+backward MiB'], '.0f')} "
            f"| {cells[0]} | {cells[1]} |"
        )
    lines += memory
    if layer:
        lines += targets(rows, layer, gemm, heap)
    return "\n".join(lines) + "\n"


def render(path: Path) -> str:
    """The tables again from a stored JSON file (``--render``), without measuring."""
    stored = json.loads(path.read_text())
    args = argparse.Namespace(**stored["args"])
    return markdown(stored["rows"], stored["gemm"], args, stored["layer"], stored.get("heap"))


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        workload, contender, N, mode, dtype, threads = sys.argv[2:8]
        measure_peak(workload, contender, int(N), mode, dtype, int(threads))
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096, 16384])
    parser.add_argument("--workloads", nargs="+", default=["attention", "numerator"])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    parser.add_argument(
        "--reference-max", type=int, default=16384, help="longest N for the plain-PyTorch form"
    )
    parser.add_argument(
        "--full-max", type=int, default=4096, help="longest N for full softmax attention"
    )
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory runs")
    parser.add_argument("--quick", action="store_true", help="N=1024 and 4096, 3 repeats")
    parser.add_argument(
        "--fresh-pages", action="store_true", help="only time fresh against kept outputs"
    )
    parser.add_argument(
        "--output", type=Path, default=ROOT / "docs" / "benchmarks" / "causal_linear.md"
    )
    parser.add_argument(
        "--render", action="store_true", help="rewrite the tables from the stored JSON only"
    )
    parser.add_argument("--layer-on-heap", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.layer_on_heap:  # the child of layer_against_bare_op_on_heap
        torch.set_num_threads(args.threads)
        gemm = gemm_gflops(args.threads, getattr(torch, args.dtype))
        print(json.dumps({"gemm": gemm, "layer": layer_against_bare_op(args)}))
        return
    if args.render:
        table = render(args.output.with_suffix(".json"))
        print(table)
        args.output.write_text(table)
        return
    if args.quick:
        args.lengths, args.repeats = [1024, 4096], 3
    if args.fresh_pages:
        fresh_pages(args)
        return
    args.torch = torch.__version__
    args.command = "".join(f" {a}" for a in sys.argv[1:])
    if not have_fast_transformers():
        print(
            "pytorch-fast-transformers is not installed: timing attention-core alone",
            file=sys.stderr,
        )
    rows, gemm = run(args)
    layer, heap = [], None
    if {"attention", "numerator"} <= set(args.workloads):
        layer = layer_against_bare_op(args)
        heap = layer_against_bare_op_on_heap(args)
    table = markdown(rows, gemm, args, layer, heap)
    print(table)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(table)
    # the numbers, for --render and benchmarks/plot_results.py
    keep = {k: getattr(args, k) for k in ("dtype", "threads", "repeats", "torch", "command")}
    stored = {"args": keep, "gemm": gemm, "layer": layer, "heap": heap, "rows": rows}
    args.output.with_suffix(".json").write_text(json.dumps(stored, indent=1) + "\n")


if __name__ == "__main__":
    main()
