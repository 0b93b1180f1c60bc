"""Feedback Transformer: this project against feedback-transformer-pytorch 0.0.11.

Run with ``nox -s bench`` or directly: ``python benchmarks/bench_feedback.py [--quick]``.
Writes the table to ``docs/benchmarks/feedback.md``.

Both models in one process, same sizes (the PEERS.md configuration: dim 128, depth 2, 8 heads
of 64, mem_len 64, batch 2, vocabulary 256), same threads, float32, dropout off:

1. training and inference throughput at seq_len 1 (the paper's exact model) and 2: tokens per
   second of ``model(x)`` under ``torch.no_grad()`` and of forward + backward of a next-token
   loss, and the bytes saved for the backward pass (tensors saved by autograd, deduplicated by
   storage, plus, for ours, the key/value buffer of the call that the backward reads);
2. token-by-token decoding at mem_len 64 and 1024: ours ``model.step`` (ring-buffer memory);
   the peer has no generation API, so its decoding is ``model(token, memory=memory,
   return_memory=True)`` with a seq_len 1 model, one token at a time. The memory starts full
   (random keys and values of the right shapes: a step's cost does not depend on the values).

The peer is imported if it is installed (``pip install --no-deps
feedback-transformer-pytorch==0.0.11``; it needs only torch and einops). Without it, only our
numbers are reported.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from feedback_transformer import FeedbackMemory, FeedbackTransformer

ROOT = Path(__file__).resolve().parents[1]
DIM, DEPTH, HEADS, DIM_HEAD, VOCAB, BATCH = 128, 2, 8, 64, 256, 2


def import_peer():
    try:
        from feedback_transformer_pytorch import FeedbackTransformer as Peer
    except ImportError:
        return None
    return Peer


def build(kind: str, Peer, seq_len: int, mem_len: int):
    torch.manual_seed(0)
    options = dict(
        num_tokens=VOCAB, dim=DIM, depth=DEPTH, seq_len=seq_len, mem_len=mem_len,
        heads=HEADS, dim_head=DIM_HEAD,
    )  # fmt: skip
    model = FeedbackTransformer(**options) if kind == "ours" else Peer(**options)
    return model


def median_time(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def saved_bytes(kind: str, model, x: Tensor) -> int:
    """Bytes kept for the backward pass of ``model(x)``."""
    storages: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(x).float().logsumexp(-1).mean()
    total = sum(storages.values())
    if kind == "ours":  # the call's key/value buffer, read by the backward pass (not "saved")
        total += 2 * BATCH * HEADS * x.shape[1] * DIM_HEAD * 4
    del loss
    return total


def training(Peer, seq_len: int, n: int, repeats: int) -> list[dict]:
    rows = []
    x = torch.randint(0, VOCAB, (BATCH, n), generator=torch.Generator().manual_seed(0))
    for kind in ("peer", "ours"):
        if kind == "peer" and Peer is None:
            continue
        model = build(kind, Peer, seq_len, 64)

        def forward(model=model):
            with torch.no_grad():
                model(x)

        def train(model=model):
            logits = model(x[:, :-1])
            F.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten()).backward()

        fwd = median_time(forward, repeats)
        fwd_bwd = median_time(train, repeats)
        rows.append(
            dict(
                contender=kind,
                seq_len=seq_len,
                fwd=BATCH * n / fwd,
                fwd_bwd=BATCH * (n - 1) / fwd_bwd,
                saved=saved_bytes(kind, model, x) / 2**20,
            )
        )
    return rows


def decoding(Peer, mem_len: int, steps: int, repeats: int) -> list[dict]:
    rows = []
    g = torch.Generator().manual_seed(1)
    keys, values = (torch.randn(BATCH, HEADS, mem_len, DIM_HEAD, generator=g) for _ in range(2))
    tokens = torch.randint(0, VOCAB, (BATCH, steps + 1), generator=g)
    for kind in ("peer", "ours"):
        if kind == "peer" and Peer is None:
            continue
        model = build(kind, Peer, 1, mem_len).eval()
        if kind == "ours":

            def run(model=model):
                with torch.no_grad():
                    _, state = model.prefill(tokens[:, :1], memory=FeedbackMemory(keys, values))
                    start = time.perf_counter()
                    for t in range(1, steps + 1):
                        _, state = model.step(tokens[:, t], state)
                    return time.perf_counter() - start

        else:
            # the peer's memory: (b, m, heads * dim_head) keys and values
            memory = tuple(t.transpose(1, 2).reshape(BATCH, mem_len, -1) for t in (keys, values))

            def run(model=model, memory=memory):
                with torch.no_grad():
                    _, mem = model(tokens[:, :1], memory=memory, return_memory=True)
                    start = time.perf_counter()
                    for t in range(1, steps + 1):
                        _, mem = model(tokens[:, t : t + 1], memory=mem, return_memory=True)
                    return time.perf_counter() - start

        run()  # warm-up
        elapsed = statistics.median(run() for _ in range(repeats))
        rows.append(dict(contender=kind, mem_len=mem_len, tokps=BATCH * steps / elapsed))
    return rows


def _ratio(value: float, base: float | None) -> str:
    return "" if base is None else f" ({value / base:.2f}x)"


def markdown(train_rows, decode_rows, args, n: int, steps: int, have_peer: bool) -> str:
    label = {"peer": "feedback-transformer-pytorch 0.0.11", "ours": "feedback-transformer (ours)"}
    lines = [
        "# Feedback Transformer benchmark",
        "",
        f"`python benchmarks/bench_feedback.py{' --quick' if args.quick else ''}` on "
        f"{datetime.date.today().isoformat()}, {platform.machine()}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, float32, CPU. Medians of {args.repeats} runs; the "
        "machine is shared with other jobs, so the numbers are noisy: read the ratios.",
        "",
        f"Model: dim {DIM}, depth {DEPTH}, {HEADS} heads x {DIM_HEAD}, mem_len 64, vocabulary "
        f"{VOCAB}, dropout 0. Training and inference: batch {BATCH} x {n} tokens (forward + "
        "backward of a next-token loss); 'saved' is what autograd keeps for the backward pass "
        "(for ours, plus the call's key/value buffer).",
        "",
    ]
    if not have_peer:
        lines += ["feedback-transformer-pytorch was not importable in this run: ours alone.", ""]
    lines += [
        "| contender | seq_len | fwd tok/s | fwd+bwd tok/s | saved for backward (MiB) |",
        "|---|---:|---:|---:|---:|",
    ]
    for seq_len in sorted({r["seq_len"] for r in train_rows}):
        rows = {r["contender"]: r for r in train_rows if r["seq_len"] == seq_len}
        base = rows.get("peer")
        for kind, r in rows.items():
            cells = [
                f"{r[key]:,.{digits}f}{_ratio(r[key], base and base[key])}"
                for key, digits in (("fwd", 0), ("fwd_bwd", 0), ("saved", 1))
            ]
            lines.append(f"| {label[kind]} | {seq_len} | " + " | ".join(cells) + " |")
    lines += [
        "",
        f"Token-by-token decoding (seq_len 1, batch {BATCH}, {steps} steps after a full memory; "
        "ours: `model.step`; the peer: `model(token, memory=memory, return_memory=True)`):",
        "",
        "| contender | mem_len | tokens/s |",
        "|---|---:|---:|",
    ]
    for mem_len in sorted({r["mem_len"] for r in decode_rows}):
        rows = {r["contender"]: r for r in decode_rows if r["mem_len"] == mem_len}
        base = rows.get("peer")
        for kind, r in rows.items():
            ratio = _ratio(r["tokps"], base and base["tokps"])
            lines.append(f"| {label[kind]} | {mem_len} | {r['tokps']:,.0f}{ratio} |")
    lines += [
        "",
        "Ratios are against the peer (higher is better for tokens/s, lower for memory). The two "
        "models are not the same function: the peer's window tokens also attend to themselves "
        "and its memory ignores distance in the position bias; the work per step is the same.",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="shorter inputs, fewer repeats")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=str(ROOT / "docs" / "benchmarks" / "feedback.md"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    Peer = import_peer()
    args.repeats = 3 if args.quick else 7
    n = 32 if args.quick else 256
    steps = 16 if args.quick else 128
    train_rows = training(Peer, 1, n, args.repeats) + training(Peer, 2, n, args.repeats)
    decode_rows = decoding(Peer, 64, steps, args.repeats) + decoding(
        Peer, 1024, steps, args.repeats
    )
    report = markdown(train_rows, decode_rows, args, n, steps, Peer is not None)
    print(report)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(report)


if __name__ == "__main__":
    main()
