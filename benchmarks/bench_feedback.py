"""Feedback Transformer: this project against feedback-transformer-pytorch 0.0.11.

Run with ``nox -s bench`` or directly: ``python benchmarks/bench_feedback.py [--quick]``.
Writes the tables to ``docs/benchmarks/feedback.md``, the training rows to ``feedback.json``
and the decoding sweep to ``feedback_generation.json`` beside it (rows of ``model``,
``context``, ``ms_per_token``); ``benchmarks/plot_results.py`` plots both.

Both models in one process, same sizes (dim 256, depth 4, 8 heads of
64, mem_len 256, batch 2 as in the peer's README, vocabulary 256), same threads, float32,
dropout off:

1. training and inference throughput at seq_len 2 (512 tokens) and 1 (the paper's exact
   model, 128 tokens): tokens per second of ``model(x)`` under ``torch.no_grad()`` and of
   forward + backward of a next-token loss, and the bytes saved for the backward pass
   (tensors saved by autograd, deduplicated by storage, parameters excluded, plus, for ours,
   the key/value buffer of the call that the backward reads);
2. token-by-token decoding, batch 1, mem_len 1024, with the memory filled to 16, 64, 256 and
   1024 steps (random keys and values of the right shapes: a step's cost does not depend on
   the values): milliseconds per token. Ours: ``model.step`` (ring-buffer memory); the peer
   has no generation API, so its decoding is ``model(token, memory=memory,
   return_memory=True)`` with a seq_len 1 model, one token at a time. Beside them, in the same
   run, the attention's read of the memory alone (``depth`` layers of one query per head over
   the filled slots, in torch ops that read the same bytes as the model's
   ``cache_attention`` calls): a token of ours should grow with the fill by no more than that
   read.

The peer is imported if it is installed (``pip install --no-deps
feedback-transformer-pytorch==0.0.11``; it needs only torch and einops). Without it, only our
numbers are reported.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from timing import Elapsed, interleaved_medians
from torch import Tensor

from feedback_transformer import FeedbackMemory, FeedbackTransformer

ROOT = Path(__file__).resolve().parents[1]
DIM, DEPTH, HEADS, DIM_HEAD, VOCAB, BATCH, MEM_LEN = 256, 4, 8, 64, 256, 2, 256
DECODE_MEM_LEN, FILLS = 1024, (16, 64, 256, 1024)
LABEL = {
    "peer": "feedback-transformer-pytorch",
    "ours": "feedback (ours)",
    "read": "its attention's read of the memory alone",
    "read in step": "that read with each layer's weights read before it, as in a step",
}


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


def saved_bytes(kind: str, model, x: Tensor) -> int:
    """Activation bytes kept for the backward pass of ``model(x)`` (the parameters, which
    autograd also saves, are not counted)."""
    storages: dict[int, int] = {}
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
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
    x = torch.randint(0, VOCAB, (BATCH, n), generator=torch.Generator().manual_seed(0))
    kinds = ["ours"] if Peer is None else ["peer", "ours"]
    models = {kind: build(kind, Peer, seq_len, MEM_LEN) for kind in kinds}
    forwards, trains = {}, {}
    for kind, model in models.items():

        def forward(model=model):
            with torch.no_grad():
                model(x)

        def train(model=model):
            logits = model(x[:, :-1])
            F.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten()).backward()

        forwards[kind], trains[kind] = forward, train

    fwd = interleaved_medians(forwards, repeats)
    fwd_bwd = interleaved_medians(trains, repeats)
    return [
        dict(
            contender=kind,
            seq_len=seq_len,
            n=n,
            fwd=BATCH * n / fwd[kind],
            fwd_bwd=BATCH * (n - 1) / fwd_bwd[kind],
            saved=saved_bytes(kind, model, x) / 2**20,
        )
        for kind, model in models.items()
    ]


def decoding(Peer, fill: int, steps: int, repeats: int) -> list[dict]:
    """Milliseconds per token of batch-1 decoding after a memory of ``fill`` steps."""
    runs = {}
    g = torch.Generator().manual_seed(1)
    keys, values = (torch.randn(1, HEADS, fill, DIM_HEAD, generator=g) for _ in range(2))
    tokens = torch.randint(0, VOCAB, (1, steps + 1), generator=g)
    for kind in ("peer", "ours"):
        if kind == "peer" and Peer is None:
            continue
        model = build(kind, Peer, 1, DECODE_MEM_LEN).eval()
        if kind == "ours":
            ours = model

            def run(model=model):
                with torch.no_grad():
                    memory = FeedbackMemory(keys, values)
                    _, state = model.prefill(tokens[:, :1], memory=memory)
                    start = time.perf_counter()
                    for t in range(1, steps + 1):
                        _, state = model.step(tokens[:, t], state)
                    return Elapsed(time.perf_counter() - start)

        else:
            # the peer's memory: (b, m, heads * dim_head) keys and values
            memory = tuple(t.transpose(1, 2).reshape(1, fill, -1) for t in (keys, values))

            def run(model=model, memory=memory):
                with torch.no_grad():
                    _, mem = model(tokens[:, :1], memory=memory, return_memory=True)
                    start = time.perf_counter()
                    for t in range(1, steps + 1):
                        _, mem = model(tokens[:, t : t + 1], memory=mem, return_memory=True)
                    return Elapsed(time.perf_counter() - start)

        runs[kind] = run

    # the attention's read of the memory alone, as a token of ours does it: per layer one query
    # row per head over the `fill` memory slots with the position bias, in torch ops
    # (`baddbmm`, softmax, `bmm`; the same shapes and bytes as the token's `cache_attention`)
    query = torch.randn(HEADS, 1, DIM_HEAD, generator=g)
    bias = torch.randn(HEADS, 1, fill, generator=g)
    memory_keys, memory_values = keys[0], values[0]  # (heads, fill, dim_head)

    def read():
        with torch.no_grad():
            start = time.perf_counter()
            for _ in range(steps * DEPTH):
                scores = torch.baddbmm(bias, query, memory_keys.mT)
                torch.bmm(scores.softmax(dim=-1), memory_values)
            return Elapsed(time.perf_counter() - start)

    runs["read"] = read

    # the same read where a step does it: after each layer's dense products, whose weights
    # (4 MiB a layer) pass through the caches between the layers' reads of the memory; the
    # products cost the same at every fill, so the row's growth is the read's in a step
    layers = [
        [m.weight for m in layer.modules() if isinstance(m, torch.nn.Linear)]
        for layer in ours.layers
    ]
    rows_in = {w.shape[1]: torch.randn(1, w.shape[1], generator=g) for ws in layers for w in ws}

    def read_in_step():
        with torch.no_grad():
            start = time.perf_counter()
            for _ in range(steps):
                for weights in layers:
                    for w in weights:
                        F.linear(rows_in[w.shape[1]], w)
                    scores = torch.baddbmm(bias, query, memory_keys.mT)
                    torch.bmm(scores.softmax(dim=-1), memory_values)
            return Elapsed(time.perf_counter() - start)

    runs["read in step"] = read_in_step
    elapsed = interleaved_medians(runs, repeats)
    return [
        dict(
            model=f"{LABEL[kind]}, d={DIM} depth {DEPTH}",
            context=fill,
            ms_per_token=round(1e3 * elapsed[kind] / steps, 3),
        )
        for kind in runs
    ]


def _ratio(value: float, base: float | None) -> str:
    return "" if base is None else f" ({value / base:.2f}x)"


def markdown(train_rows, decode_rows, args, steps: int, have_peer: bool) -> str:
    label = {"peer": "feedback-transformer-pytorch 0.0.11", "ours": "feedback-transformer (ours)"}
    lines = [
        f"`python benchmarks/bench_feedback.py{' --quick' if args.quick else ''}` on "
        f"{datetime.date.today().isoformat()}, {platform.machine()}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, float32, CPU. Medians of {args.repeats} runs; "
        "absolute numbers vary between runs: read the ratios.",
        "",
        f"Model: dim {DIM}, depth {DEPTH}, {HEADS} heads x {DIM_HEAD}, mem_len {MEM_LEN}, "
        f"vocabulary {VOCAB}, dropout 0. Training and inference: batch {BATCH} x n tokens "
        "(forward + backward of a next-token loss); 'saved' is the activation memory that "
        "autograd keeps for the backward pass, parameters excluded (for ours, plus the call's "
        "key/value buffer).",
        "",
    ]
    if not have_peer:
        lines += ["feedback-transformer-pytorch was not importable in this run: ours alone.", ""]
    lines += [
        "| contender | seq_len | n | fwd tok/s | fwd+bwd tok/s | saved for backward (MiB) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for seq_len in dict.fromkeys(r["seq_len"] for r in train_rows):
        rows = {r["contender"]: r for r in train_rows if r["seq_len"] == seq_len}
        base = rows.get("peer")
        for kind, r in rows.items():
            cells = [
                f"{r[key]:,.{digits}f}{_ratio(r[key], base and base[key])}"
                for key, digits in (("fwd", 0), ("fwd_bwd", 0), ("saved", 1))
            ]
            lines.append(f"| {label[kind]} | {seq_len} | {r['n']} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Our forward without gradients runs each window as one call of attention-core's step "
        "chain (`attention_core.step_chain.StepChain`, built once per call), and so does a "
        "decoding step with seq_len 1; forward + backward runs the training path, one autograd "
        "node per layer and window.",
        "",
        f"Token-by-token decoding (seq_len 1, batch 1, mem_len {DECODE_MEM_LEN}, {steps} steps "
        "after a memory of `fill` steps; ours: `model.step`; the peer: `model(token, "
        "memory=memory, return_memory=True)`), milliseconds per token:",
        "",
        "| contender | " + " | ".join(f"fill {f}" for f in FILLS) + " | fill "
        f"{FILLS[-1]} / fill {FILLS[0]} | fill {FILLS[-1]} - fill {FILLS[0]} (ms) |",
        "|---|" + "---:|" * (len(FILLS) + 2),
    ]
    for model in dict.fromkeys(r["model"] for r in decode_rows):
        ms = {r["context"]: r["ms_per_token"] for r in decode_rows if r["model"] == model}
        cells = [f"{ms[f]:.3f}" for f in FILLS]
        growth = ms[FILLS[-1]] - ms[FILLS[0]]
        lines.append(
            f"| {model} | " + " | ".join(cells) + f" | {ms[FILLS[-1]] / ms[FILLS[0]]:.2f}x "
            f"| {growth:.3f} |"
        )
    lines += [
        "",
        "Ratios in the first table are against the peer (higher is better for tokens/s, lower "
        "for memory); the last column of the second is how much a token slows down as the "
        "memory fills (1.00x: flat), the last how many milliseconds it gains. The row "
        f"'{LABEL['read']}' times, in the same run, what a token of ours must read: "
        f"{DEPTH} layers of attention, one query per head over the `fill` memory slots with "
        "the position bias, back to back, so the memory stays in the cores' caches. The "
        f"row '{LABEL['read in step']}' runs each layer's dense products before its read, as "
        "a step does: their weights pass through the caches between the reads, which then "
        "come from further away. Ours should gain no more than that row as the memory "
        "fills. "
        "The two models are not the same function: the peer's "
        "window tokens also attend to themselves and its memory ignores distance in the "
        "position bias; the work per step is the same.",
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
    args.repeats = 2 if args.quick else 5
    steps = 16 if args.quick else 32
    train_rows = training(Peer, 2, 64 if args.quick else 512, args.repeats)
    train_rows += training(Peer, 1, 32 if args.quick else 128, args.repeats)
    decode_rows = [row for fill in FILLS for row in decoding(Peer, fill, steps, args.repeats)]
    report = markdown(train_rows, decode_rows, args, steps, Peer is not None)
    print(report)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(report)
    sweep = out.with_name(out.stem + "_generation.json")
    sweep.write_text(json.dumps(decode_rows, indent=1) + "\n")
    out.with_suffix(".json").write_text(json.dumps(train_rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
