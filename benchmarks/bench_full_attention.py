"""Softmax attention on the CPU: attention-core's FullAttention (on PyTorch's fused
``scaled_dot_product_attention``) against a bare SDPA call with the same masks and against
pytorch-fast-transformers 0.4's FullAttention. Run by ``nox -s bench`` or directly
(``--quick`` for a short run).

Same process, same inputs, same thread count for every contender; timed in turns
(``timing.interleaved_medians``). Two workloads:

- ``layer``: the attention module alone, B=1, H=8, E=D=64, float32, inputs ``(B, N, H, E)``,
  forward and forward+backward, with a causal mask (``TriangularCausalMask``) or a length mask
  (three quarters of the keys valid). Contenders: ``attention-core`` (the fused path),
  ``bare SDPA`` (one ``scaled_dot_product_attention`` call on ``(B, H, N, E)`` tensors with
  ``is_causal`` or an ``(B, 1, 1, N)`` boolean mask), ``explicit`` (attention-core with an
  event listener registered, which builds the attention matrix) and ``fast-transformers``
  (skipped with a note when it is not installed). The explicit and fast-transformers rows stop
  at ``--dense-max`` (their ``N x N`` matrices need gigabytes beyond it).
- ``bert``: the BERT-size encoder of fast-transformers' own example, forward (12 layers,
  12 heads of 64, feed-forward 3072, GELU, input 10 x 512 x 768), attention-core against
  fast-transformers.

Peak memory is measured per contender in a fresh subprocess, as in ``bench_causal_linear.py``
(growth of the peak resident set during one call, MiB). Medians from a shared machine are
noisy: read the ratios. The table goes to stdout and to ``docs/benchmarks/full_attention.md``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from bench_causal_linear import peak_rss_kib, reset_peak_rss_kib
from timing import interleaved_medians

ROOT = Path(__file__).resolve().parents[1]
H, E = 8, 64
MASKS = ["causal", "lengths"]
MODES = ["forward", "forward+backward"]
CONTENDERS = ["attention-core", "bare SDPA", "explicit", "fast-transformers"]
DENSE = {"explicit", "fast-transformers"}  # contenders that store N x N matrices


def have_fast_transformers() -> bool:
    try:
        import fast_transformers.attention  # noqa: F401
    except ImportError:
        return False
    return True


# ---------------------------------------------------------------------------------------
# contenders
# ---------------------------------------------------------------------------------------


def valid_keys(N: int) -> int:
    return 3 * N // 4


def make_call(contender: str, N: int, mask: str):
    """A function of ``(q, k, v)``, all ``(1, N, H, E)``, for one contender and mask."""
    if contender == "bare SDPA":
        allowed = (torch.arange(N) < valid_keys(N))[None, None, None, :]

        def bare(q, k, v):
            q, k, v = (t.transpose(1, 2) for t in (q, k, v))
            if mask == "causal":
                return F.scaled_dot_product_attention(q, k, v, is_causal=True)
            return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)

        return bare
    if contender == "fast-transformers":
        from fast_transformers.attention import FullAttention
        from fast_transformers.masking import FullMask, LengthMask, TriangularCausalMask
    else:
        from attention_core.attention import FullAttention
        from attention_core.events import AttentionEvent, EventDispatcher
        from attention_core.masking import FullMask, LengthMask, TriangularCausalMask
    if contender == "explicit":
        dispatcher = EventDispatcher()
        dispatcher.listen(AttentionEvent, lambda event: None)
        attention = FullAttention(attention_dropout=0.0, event_dispatcher=dispatcher)
    else:
        attention = FullAttention(attention_dropout=0.0)
    full = LengthMask(torch.tensor([N]), max_len=N)
    if mask == "causal":
        attn_mask, key_lengths = TriangularCausalMask(N), full
    else:
        attn_mask, key_lengths = FullMask(N), LengthMask(torch.tensor([valid_keys(N)]), max_len=N)
    return lambda q, k, v: attention(q, k, v, attn_mask, full, key_lengths)


def make_inputs(N: int, grad: bool):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(1, N, H, E, generator=g, requires_grad=grad) for _ in range(3)]


def step(fn, inputs, mode: str) -> None:
    if mode == "forward":
        with torch.no_grad():
            fn(*inputs)
    else:
        fn(*inputs).sum().backward()


def make_bert(contender: str):
    if contender == "fast-transformers":
        from fast_transformers.builders import TransformerEncoderBuilder
    else:
        from attention_core.builders import TransformerEncoderBuilder
    torch.manual_seed(0)
    return TransformerEncoderBuilder.from_kwargs(
        n_layers=12, n_heads=12, query_dimensions=64, value_dimensions=64,
        feed_forward_dimensions=3072, attention_type="full", activation="gelu",
    ).get().eval()  # fmt: skip


def bert_forward(model, x) -> None:
    with torch.no_grad():
        model(x)


# ---------------------------------------------------------------------------------------
# peak memory: one subprocess per measurement
# ---------------------------------------------------------------------------------------


def measure_peak(contender: str, N: int, mask: str, mode: str, threads: int) -> None:
    """Run in a child: print the growth of the peak RSS (MiB) caused by one call."""
    torch.set_num_threads(threads)
    step(make_call(contender, 64, mask), make_inputs(64, mode != "forward"), mode)  # lazy init
    fn, inputs = make_call(contender, N, mask), make_inputs(N, mode != "forward")
    before = reset_peak_rss_kib()
    step(fn, inputs, mode)
    print(json.dumps({"peak_mib": (peak_rss_kib() - before) / 1024}))


def peak_mib(contender: str, N: int, mask: str, mode: str, threads: int) -> float | None:
    command = [sys.executable, __file__, "--child", contender, str(N), mask, mode, str(threads)]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        print(result.stderr[-2000:], file=sys.stderr)
        return None
    return json.loads(result.stdout.strip().splitlines()[-1])["peak_mib"]


# ---------------------------------------------------------------------------------------
# the tables
# ---------------------------------------------------------------------------------------


def layer_rows(args, contenders: list[str]) -> list[dict]:
    rows = []
    for mask in MASKS:
        for N in args.lengths:
            present = [c for c in contenders if c not in DENSE or args.dense_max >= N]
            fns = {c: make_call(c, N, mask) for c in present}
            timed = {}
            for mode in MODES:
                inputs = make_inputs(N, mode != "forward")
                calls = {c: (lambda fn=fn: step(fn, inputs, mode)) for c, fn in fns.items()}  # noqa: B023
                timed[mode] = interleaved_medians(calls, args.repeats)
            for c in present:
                row = {"mask": mask, "N": N, "contender": c}
                for mode in MODES:
                    row[mode] = timed[mode][c] * 1e3
                    row[f"{mode} MiB"] = (
                        None if args.no_memory else peak_mib(c, N, mask, mode, args.threads)
                    )
                rows.append(row)
                print(
                    f"{mask:8s} N={N:6d} {c:18s} fwd {row['forward']:9.1f} ms  fwd+bwd "
                    f"{row['forward+backward']:9.1f} ms  peak {row['forward MiB']} / "
                    f"{row['forward+backward MiB']} MiB",
                    flush=True,
                )
    return rows


def bert_times(args, peer: bool) -> dict[str, float]:
    x = torch.rand(10, 512, 64 * 12)
    models = {"attention-core": make_bert("attention-core")}
    if peer:
        models["fast-transformers"] = make_bert("fast-transformers")
    calls = {name: (lambda m=m: bert_forward(m, x)) for name, m in models.items()}
    times = interleaved_medians(calls, args.bert_repeats)
    for name, t in times.items():
        print(f"bert forward {name:18s} {t * 1e3:9.1f} ms", flush=True)
    return {name: t * 1e3 for name, t in times.items()}


def fmt(x, spec: str) -> str:
    return "n/a" if x is None else format(x, spec)


def markdown(rows: list[dict], bert: dict[str, float], args, peer: bool) -> str:
    """Two tables (times against the bare SDPA call; speed-up over fast-transformers and peak
    memory), then the BERT-size encoder's forward."""
    note = "" if peer else " pytorch-fast-transformers was not installed: its column is empty."
    lines = [
        f"Softmax attention as a layer on the CPU: B=1, H={H}, E=D={E}, float32, "
        f"{args.threads} threads, torch {args.torch}, medians of {args.repeats} runs "
        f"timed in turns. Masks: `causal` = TriangularCausalMask, `lengths` = a length "
        f"mask with 3/4 of the keys valid. `explicit` is attention-core with an event "
        f"listener registered. Command: "
        f"`python benchmarks/bench_full_attention.py{args.command}`.{note}",
        "",
        "Time in ms; vs SDPA = this row's time / the bare SDPA call's (lower is better).",
        "",
        "| mask | N | contender | forward | fwd+bwd | vs SDPA fwd | vs SDPA fwd+bwd |",
        "| --- | ---: | --- | ---: | ---: | ---: | ---: |",
    ]
    second = [
        "",
        "Speed-up = fast-transformers' time / this row's time (higher is better); peak = "
        "growth of the peak RSS during one call (MiB).",
        "",
        "| mask | N | contender | speed-up fwd | speed-up fwd+bwd | peak fwd | peak fwd+bwd |",
        "| --- | ---: | --- | ---: | ---: | ---: | ---: |",
    ]
    by = {(r["mask"], r["N"], r["contender"]): r for r in rows}
    for r in rows:
        sdpa = by.get((r["mask"], r["N"], "bare SDPA"))
        ft = by.get((r["mask"], r["N"], "fast-transformers"))
        vs_sdpa = [fmt(r[m] / sdpa[m] if sdpa else None, ".2f") + "x" * bool(sdpa) for m in MODES]
        vs_ft = [fmt(ft[m] / r[m] if ft else None, ".1f") + "x" * bool(ft) for m in MODES]
        key = f"| {r['mask']} | {r['N']} | {r['contender']} "
        lines.append(
            key + f"| {r['forward']:.1f} | {r['forward+backward']:.1f} "
            f"| {vs_sdpa[0]} | {vs_sdpa[1]} |"
        )
        second.append(
            key + f"| {vs_ft[0]} | {vs_ft[1]} | {fmt(r['forward MiB'], '.0f')} "
            f"| {fmt(r['forward+backward MiB'], '.0f')} |"
        )
    lines += second
    if bert:
        ours, theirs = bert["attention-core"], bert.get("fast-transformers")
        ratio = f" ({theirs / ours:.2f}x faster than fast-transformers' {theirs:.0f} ms)"
        lines += [
            "",
            f"The BERT-base-size encoder of fast-transformers' own example (12 layers, 12 heads "
            f"of 64, feed-forward 3072, input 10 x 512 x 768), forward, median of "
            f"{args.bert_repeats} runs timed in turns: attention-core {ours:.0f} ms"
            + (ratio if theirs else "")
            + ".",
        ]
    return "\n".join(lines) + "\n"


def render(path: Path) -> str:
    """The tables again from a stored JSON file (``--render``), without measuring."""
    stored = json.loads(path.read_text())
    args = argparse.Namespace(**stored["args"])
    peer = any(r["contender"] == "fast-transformers" for r in stored["layer"])
    return markdown(stored["layer"], stored["bert"], args, peer)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        contender, N, mask, mode, threads = sys.argv[2:7]
        measure_peak(contender, int(N), mask, mode, int(threads))
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096, 16384])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--bert-repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--dense-max", type=int, default=4096, help="longest N for explicit / fast-transformers"
    )
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory runs")
    parser.add_argument("--no-bert", action="store_true", help="skip the BERT-size encoder")
    parser.add_argument("--quick", action="store_true", help="N=1024 and 4096, 3 repeats")
    parser.add_argument(
        "--output", type=Path, default=ROOT / "docs" / "benchmarks" / "full_attention.md"
    )
    parser.add_argument(
        "--render", action="store_true", help="rewrite the tables from the stored JSON only"
    )
    args = parser.parse_args()
    if args.render:
        table = render(args.output.with_suffix(".json"))
        print(table)
        args.output.write_text(table)
        return
    if args.quick:
        args.lengths, args.repeats, args.bert_repeats = [1024, 4096], 3, 2
    args.torch = torch.__version__
    args.command = "".join(f" {a}" for a in sys.argv[1:])
    torch.set_num_threads(args.threads)
    peer = have_fast_transformers()
    if not peer:
        print("pytorch-fast-transformers is not installed: its column is skipped", file=sys.stderr)
    contenders = [c for c in CONTENDERS if c != "fast-transformers" or peer]
    rows = layer_rows(args, contenders)
    bert = {} if args.no_bert else bert_times(args, peer)
    table = markdown(rows, bert, args, peer)
    print(table)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(table)
    keep = {k: getattr(args, k) for k in ("threads", "repeats", "bert_repeats", "torch", "command")}
    stored = {"args": keep, "layer": rows, "bert": bert}
    args.output.with_suffix(".json").write_text(json.dumps(stored) + "\n")


if __name__ == "__main__":
    main()
