"""Train a small character-level language model on the CPU, then stream a sample from it.

    nox -s demo                                   # causal linear attention, about 2 minutes
    nox -s demo -- --model feedback --minutes 1   # any option after --
    python examples/demo.py --model block-recurrent --data my.txt --resume

The default corpus needs no download: the Python standard library's own source files on this
machine. Text is read as bytes (vocabulary 256), split 95/5 into training and validation, and
the model trains on random windows for ``--minutes`` (or ``--steps``), with a progress bar
showing loss and tokens per second. At the end it prints the validation bits per character,
saves a checkpoint that ``--resume`` continues from, and streams a generated sample token by
token through the model's recurrent form (``attention_core.generation.stream``).

Model families (``--model``):

- ``linear``: a causal-linear transformer (Katharopoulos et al. 2020, arXiv 2006.16236) that
  trains in parallel and generates as an RNN at a constant cost per token
  (recurrent_transformer.lm.RecurrentLM);
- ``full``: the same with softmax attention, its key/value cache growing per token;
- ``block-recurrent``: the Block-Recurrent Transformer (Hutchins et al. 2022, arXiv 2203.07852);
- ``feedback``: the Feedback Transformer (Fan et al. 2021, arXiv 2002.09402), trained in
  windows of ``seq_len`` tokens and decoded token by token.
"""

from __future__ import annotations

import argparse
import math
import sys
import sysconfig
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

FAMILIES = ("linear", "full", "block-recurrent", "feedback")
VOCAB = 256  # bytes


# ---------------------------------------------------------------------------------------
# data
# ---------------------------------------------------------------------------------------


def stdlib_corpus(max_bytes: int) -> bytes:
    """Up to ``max_bytes`` of the standard library's ``*.py`` files, in a fixed order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    chunks, total = [], 0
    for path in sorted(root.glob("*.py")):
        data = path.read_bytes()
        chunks.append(data)
        total += len(data)
        if total >= max_bytes:
            break
    if not chunks:
        raise SystemExit(f"no *.py files under {root}; pass --data PATH")
    return b"".join(chunks)[:max_bytes]


def load_corpus(path: str | None, max_bytes: int) -> tuple[Tensor, Tensor]:
    """Training and validation byte tensors ``(n,)`` int64 (95% / 5%)."""
    data = Path(path).read_bytes()[:max_bytes] if path else stdlib_corpus(max_bytes)
    if len(data) < 4096:
        raise SystemExit(f"the corpus has {len(data)} bytes; need at least 4096")
    tokens = torch.frombuffer(bytearray(data), dtype=torch.uint8).long()
    split = int(len(tokens) * 0.95)
    return tokens[:split], tokens[split:]


def random_windows(tokens: Tensor, batch: int, length: int, generator: torch.Generator) -> Tensor:
    """``(batch, length + 1)`` windows at random offsets of ``tokens``."""
    starts = torch.randint(0, len(tokens) - length - 1, (batch,), generator=generator)
    return torch.stack([tokens[s : s + length + 1] for s in starts.tolist()])


# ---------------------------------------------------------------------------------------
# model families: each gives a module whose logits(seq) is (B, T, V) for training, and a
# StepModel (prefill/step) for attention_core.generation
# ---------------------------------------------------------------------------------------


def build_model(family: str, dim: int, depth: int, window: int) -> nn.Module:
    """A model of ``family`` with width ``dim`` and ``depth`` layers for ``window``-token
    training windows."""
    heads = max(1, dim // 32)
    if family in ("linear", "full"):
        from recurrent_transformer.lm import RecurrentLM

        return RecurrentLM(
            num_tokens=VOCAB,
            n_layers=depth,
            n_heads=heads,
            query_dimensions=dim // heads,
            value_dimensions=dim // heads,
            attention_type="causal-linear" if family == "linear" else "full",
        )
    if family == "block-recurrent":
        from block_recurrent_transformer import BlockRecurrentTransformer

        return BlockRecurrentTransformer(
            num_tokens=VOCAB,
            dim=dim,
            depth=depth,
            dim_head=32,
            heads=heads,
            max_seq_len=window,
            block_width=min(64, window),
            num_state_vectors=min(64, window),
            recurrent_layers=(max(1, depth // 2),),
        )
    if family == "feedback":
        from feedback_transformer import FeedbackTransformer

        return FeedbackTransformer(
            num_tokens=VOCAB, dim=dim, depth=depth, seq_len=8, mem_len=window, dim_head=32,
            heads=heads,
        )  # fmt: skip
    raise SystemExit(f"--model must be one of {', '.join(FAMILIES)}; got {family!r}")


def logits_of(family: str, model: nn.Module, inputs: Tensor) -> Tensor:
    """Next-token logits ``(B, T, V)`` of ``inputs`` ``(B, T)`` in the model's training form."""
    out = model(inputs)
    return out[0] if family == "block-recurrent" else out


def bits_per_character(family: str, model: nn.Module, tokens: Tensor, window: int) -> float:
    """Mean cross entropy in bits over up to 16 consecutive validation windows."""
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, min(len(tokens) - window - 1, 16 * window), window):
            seq = tokens[start : start + window + 1][None]
            logits = logits_of(family, model, seq[:, :-1])
            total += F.cross_entropy(logits[0], seq[0, 1:], reduction="sum").item()
            count += window
    model.train()
    return total / max(count, 1) / math.log(2)


# ---------------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", choices=FAMILIES, default="linear")
    parser.add_argument("--data", help="a text file to train on (default: the stdlib sources)")
    parser.add_argument("--max-bytes", type=int, default=4_000_000)
    parser.add_argument("--minutes", type=float, default=2.0, help="training time budget")
    parser.add_argument("--steps", type=int, help="stop after this many steps instead")
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--depth", type=int, default=3)
    parser.add_argument("--window", type=int, default=128, help="training window (tokens)")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--sample-length", type=int, default=300)
    parser.add_argument("--temperature", type=float, default=0.8)
    parser.add_argument("--checkpoint", help="default: runs/demo-<model>.pt")
    parser.add_argument("--resume", action="store_true", help="continue from --checkpoint")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    """Run the demo; returns a summary (steps, tokens, validation bits per character)."""
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    train, valid = load_corpus(args.data, args.max_bytes)
    config = {k: getattr(args, k) for k in ("model", "dim", "depth", "window")}
    model = build_model(args.model, args.dim, args.depth, args.window)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    checkpoint = Path(args.checkpoint or f"runs/demo-{args.model}.pt")
    step, seen = 0, 0
    if args.resume:
        if not checkpoint.is_file():
            raise SystemExit(f"--resume: no checkpoint at {checkpoint}")
        saved = torch.load(checkpoint, weights_only=True)
        if saved["config"] != config:
            raise SystemExit(f"--resume: {checkpoint} holds {saved['config']}, not {config}")
        model.load_state_dict(saved["model_state"])
        optimizer.load_state_dict(saved["optimizer_state"])
        step, seen = saved["step"], saved["tokens"]
        print(f"resumed from {checkpoint} at step {step}")
    parameters = sum(p.numel() for p in model.parameters())
    print(
        f"{args.model}: {parameters / 1e6:.2f}M parameters, {len(train):,} training bytes, "
        f"{torch.get_num_threads()} threads"
    )

    from tqdm.auto import tqdm

    bar = tqdm(total=args.steps, disable=args.no_progress, unit="step", file=sys.stdout)
    deadline = time.perf_counter() + 60 * args.minutes
    start, first = time.perf_counter(), step
    model.train()
    while (step - first < args.steps) if args.steps else time.perf_counter() < deadline:
        seq = random_windows(train, args.batch, args.window, generator)
        logits = logits_of(args.model, model, seq[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1), seq[:, 1:].flatten())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        step += 1
        seen += seq[:, 1:].numel()
        rate = (step - first) * seq[:, 1:].numel() / (time.perf_counter() - start)
        bar.update()
        bar.set_postfix(loss=f"{loss.item():.3f}", tok_s=f"{rate:,.0f}")
    bar.close()

    bpc = bits_per_character(args.model, model, valid, args.window)
    print(f"validation: {bpc:.3f} bits per character after {step} steps ({seen:,} tokens)")
    checkpoint.parent.mkdir(parents=True, exist_ok=True)
    torch.save(
        {
            "config": config,
            "model_state": model.state_dict(),
            "optimizer_state": optimizer.state_dict(),
            "step": step,
            "tokens": seen,
        },
        checkpoint,
    )
    print(f"checkpoint: {checkpoint} (continue with --resume)")

    from attention_core.generation import stream

    model.eval()
    prompt = valid[: args.window][None]
    print("\n--- sample ---")
    sys.stdout.write(bytes(prompt[0, -80:].tolist()).decode("utf-8", "replace"))
    sys.stdout.write("\033[1m" if sys.stdout.isatty() else "")
    begin = time.perf_counter()
    produced = 0
    for token in stream(model, prompt, args.sample_length, temperature=args.temperature):
        sys.stdout.write(bytes([int(token[0])]).decode("utf-8", "replace"))
        sys.stdout.flush()
        produced += 1
    elapsed = time.perf_counter() - begin
    sys.stdout.write("\033[0m" if sys.stdout.isatty() else "")
    print(f"\n--- {produced} tokens in {elapsed:.2f} s ({produced / elapsed:.0f} tokens/s) ---")
    return {"steps": step, "tokens": seen, "bpc": bpc, "sampled": produced}


if __name__ == "__main__":
    main()
