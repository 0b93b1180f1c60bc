"""Train a small character-level language model on the CPU, then stream a sample from it.

    nox -s demo                                   # causal linear attention, about 2 minutes
    nox -s demo -- --model feedback --minutes 1   # any option after --
    nox -s demo -- --compare --minutes 1          # every family, the same budget each
    python examples/demo.py --model block-recurrent --data my.txt --resume

The default corpus needs no download: the Python standard library's own source files on this
machine. Text is read as bytes (vocabulary 256), split 95/5 into training and validation, and
the model trains on random windows for ``--minutes`` (or ``--steps``), with a progress bar
showing the training loss in bits per character and tokens per second. At the end it prints
the validation bits per character over 64 random validation windows (a fixed seed: every run
and every family is measured on the same text), saves a checkpoint that ``--resume``
continues from (it records the corpus, the options, the step and the batch generator, and
refuses another corpus or model), and streams a sample token by token through the model's
recurrent form (``attention_core.generation.stream``): a prompt from the validation text that
starts at a line, a marker, then the model's continuation.

Model families (``--model``):

- ``linear``: a causal-linear transformer (Katharopoulos et al. 2020, arXiv 2006.16236) that
  trains in parallel and generates as an RNN at a constant cost per token
  (recurrent_transformer.lm.RecurrentLM);
- ``full``: the same with softmax attention, its key/value cache growing per token;
- ``block-recurrent``: the Block-Recurrent Transformer (Hutchins et al. 2022, arXiv 2203.07852);
- ``feedback``: the Feedback Transformer (Fan et al. 2021, arXiv 2002.09402), trained in
  windows of ``--seq-len`` tokens and decoded token by token, the same function.

``--compare`` trains every family in turn on the same corpus with the same budget, each in a
process of its own, then prints one table (parameters, training tokens/s, validation bits
per character, generation tokens/s, peak memory) and, with ``--compare-out DIR``, writes it
with a plot of validation bits per character against training time. ``--budget tokens``
gives every family the training tokens of the first one instead of the same time.
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the _demo_* modules beside it

import _demo_checkpoint as checkpoints
from _demo_data import bits_per_character, load_corpus, random_windows
from _demo_progress import Progress
from _demo_text import decode_stream, marker_for, prompt_at_line_start
from _demo_threads import default_threads, plural

FAMILIES = ("linear", "full", "block-recurrent", "feedback")
VOCAB = 256  # bytes
SEQ_LEN = 16  # the Feedback Transformer's default window (tokens)


# ---------------------------------------------------------------------------------------
# model families: each gives a module whose logits(seq) is (B, T, V) for training, and a
# StepModel (prefill/step) for attention_core.generation
# ---------------------------------------------------------------------------------------


def build_model(family: str, dim: int, depth: int, window: int, seq_len: int) -> nn.Module:
    """A model of ``family`` with width ``dim`` and ``depth`` layers for ``window``-token
    training windows (``seq_len``: the Feedback Transformer's tokens per window)."""
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
            num_tokens=VOCAB, dim=dim, depth=depth, seq_len=seq_len, mem_len=window,
            dim_head=32, heads=heads,
        )  # fmt: skip
    raise SystemExit(f"--model must be one of {', '.join(FAMILIES)}; got {family!r}")


def logits_of(family: str):
    """``(model, inputs (B, T)) -> logits (B, T, V)`` in the family's training form."""
    if family == "block-recurrent":
        return lambda model, inputs: model(inputs)[0]
    return lambda model, inputs: model(inputs)


def learning_rate(base: float, progress: float) -> float:
    """Linear warm-up over the first 5% of the run, then cosine decay to 10% of ``base``
    (``progress`` in ``[0, 1]``: the fraction of the time or step budget spent)."""
    if progress < 0.05:
        return base * max(progress / 0.05, 0.02)
    return base * (0.1 + 0.45 * (1 + math.cos(math.pi * min(1.0, (progress - 0.05) / 0.95))))


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
    parser.add_argument("--lr", type=float, default=4e-3, help="peak learning rate")
    parser.add_argument(
        "--seq-len", type=int, default=SEQ_LEN,
        help="feedback: tokens per window (1: the paper's exact model; more: faster training)",
    )  # fmt: skip
    parser.add_argument("--sample-length", type=int, default=300)
    parser.add_argument("--prompt-length", type=int, default=128, help="at most, in bytes")
    parser.add_argument("--temperature", type=float, default=0.8)
    parser.add_argument("--checkpoint", help="default: runs/demo-<model>-<corpus>.pt")
    parser.add_argument("--resume", action="store_true", help="continue from --checkpoint")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, help="default: the CPUs this process may use")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--curve-points", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--summary-json", help=argparse.SUPPRESS)  # for --compare
    parser.add_argument("--compare", action="store_true", help="train every family in turn")
    parser.add_argument("--compare-out", help="with --compare: write table and plot here")
    parser.add_argument(
        "--budget", choices=("time", "tokens"), default="time",
        help="with --compare: the same training time for every family (default), or the "
        "training tokens that the first family saw in that time",
    )  # fmt: skip
    args = parser.parse_args(argv)
    if args.threads is not None and args.threads < 1:
        parser.error(f"--threads must be >= 1; got {args.threads}")
    if args.seq_len < 1:
        parser.error(f"--seq-len must be >= 1; got {args.seq_len}")
    if args.budget != "time" and not args.compare:
        parser.error("--budget applies to --compare (one family trains for --minutes or --steps)")
    if args.minutes < 0 or (args.steps is not None and args.steps < 0):
        parser.error("--minutes and --steps must be >= 0")
    return args


def set_threads(requested: int | None) -> int:
    """Use ``requested`` threads, or as many as this process has idle CPUs; print the choice."""
    threads, reason = (requested, "--threads") if requested else default_threads()
    torch.set_num_threads(threads)
    hint = "" if requested else "; --threads to change"
    print(f"using {plural(threads, 'thread')} ({reason}{hint})")
    return threads


def train(args, family, model, optimizer, corpus, generator, done: dict) -> dict:
    """The training loop: ``--steps`` steps or ``--minutes`` of training time (evaluations for
    the curve excluded). Returns the step, tokens, seconds and the validation curve."""
    logits = logits_of(family)
    budget = None if args.steps is not None else 60 * args.minutes
    progress = Progress(args.steps, budget, disabled=args.no_progress)
    step, seen, seconds = done["step"], done["tokens"], done["seconds"]
    first_step, first_seconds, curve = step, seconds, []
    marks = [(i + 1) / args.curve_points for i in range(args.curve_points)]
    model.train()
    while True:
        if budget is None:  # the fraction of the budget spent
            ran = (step - first_step) / args.steps if args.steps else 1.0
        else:
            ran = (seconds - first_seconds) / budget if budget else 1.0
        if marks and ran >= marks[0] - 1e-9:
            while marks and ran >= marks[0] - 1e-9:
                marks.pop(0)
            curve.append((seconds, bits_per_character(logits, model, corpus.valid, args.window)))
        if ran >= 1:
            break
        begin = time.perf_counter()
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(args.lr, ran)
        seq = random_windows(corpus.train, args.batch, args.window, generator)
        out = logits(model, seq[:, :-1])
        loss = F.cross_entropy(out.flatten(0, 1), seq[:, 1:].flatten())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        step += 1
        seen += seq[:, 1:].numel()
        seconds += time.perf_counter() - begin
        rate = (seen - done["tokens"]) / max(seconds - first_seconds, 1e-9)
        progress.update(step, seconds - first_seconds, loss.item() / math.log(2), rate)
    progress.close()
    return {"step": step, "tokens": seen, "seconds": seconds, "curve": curve}


def sample(args, model: nn.Module, valid: Tensor) -> tuple[int, float]:
    """Stream ``--sample-length`` tokens after a prompt from ``valid``; returns the count and
    the tokens per second."""
    from attention_core.generation import stream

    model.eval()
    prompt = prompt_at_line_start(
        valid, min(args.prompt_length, args.window), torch.Generator().manual_seed(args.seed)
    )
    marker = marker_for(sys.stdout.encoding)
    bold, plain = ("\033[1m", "\033[0m") if sys.stdout.isatty() else ("", "")
    print(f"\n--- sample: a validation prompt, then {marker} and the model's continuation ---")
    sys.stdout.write(bytes(prompt[0].tolist()).decode("utf-8", "replace") + marker + bold)
    generator = torch.Generator().manual_seed(args.seed)
    produced, begin = 0, time.perf_counter()

    def tokens():
        nonlocal produced
        for token in stream(model, prompt, args.sample_length, temperature=args.temperature,
                            generator=generator):  # fmt: skip
            produced += 1
            yield int(token[0])

    for text in decode_stream(tokens()):
        sys.stdout.write(text)
        sys.stdout.flush()
    elapsed = max(time.perf_counter() - begin, 1e-9)
    sys.stdout.write(plain)
    print(f"\n--- {produced} tokens in {elapsed:.2f} s ({produced / elapsed:.0f} tokens/s) ---")
    return produced, produced / elapsed


def main(argv: list[str] | None = None) -> dict:
    """Run the demo; returns a summary (steps, tokens, validation bits per character, ...)."""
    args = parse_args(argv)
    if args.compare:
        from _demo_compare import compare

        return compare(args, argv if argv is not None else sys.argv[1:], FAMILIES)
    threads = set_threads(args.threads)
    torch.manual_seed(args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    corpus = load_corpus(args.data, args.max_bytes)
    options = {
        k: getattr(args, k) for k in (*checkpoints.MODEL_OPTIONS, *checkpoints.TRAINING_OPTIONS)
    }
    if args.model != "feedback":  # the other families have no such option
        options["seq_len"] = None
    model = build_model(args.model, args.dim, args.depth, args.window, args.seq_len)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    path = (
        Path(args.checkpoint)
        if args.checkpoint
        else checkpoints.default_path(args.model, corpus.name)
    )
    done = {"step": 0, "tokens": 0, "seconds": 0.0}
    if args.resume:
        done = checkpoints.resume(
            path, model, optimizer, generator, options=options, corpus=corpus.identity
        )
        print(f"resumed from {path} at step {done['step']}")
    parameters = sum(p.numel() for p in model.parameters())
    print(
        f"{args.model}: {parameters / 1e6:.2f}M parameters, "
        f"{len(corpus.train):,} training bytes ({corpus.name})"
    )
    trained = train(args, args.model, model, optimizer, corpus, generator, done)
    steps_now = trained["step"] - done["step"]
    bpc = bits_per_character(logits_of(args.model), model, corpus.valid, args.window)
    print(
        f"validation: {bpc:.3f} bits per character over 64 random windows after "
        f"{trained['step']} steps ({trained['tokens']:,} tokens)"
    )
    if steps_now or not path.exists():
        if path.exists() and not args.resume:
            print(f"note: replacing {path} (a run of its own; --resume continues a checkpoint)")
        progress = {k: trained[k] for k in ("step", "tokens", "seconds")}
        checkpoints.save(
            path, model, optimizer, generator, options=options, corpus=corpus.identity, **progress
        )
        print(f"checkpoint: {path} (continue with --resume)")
    else:
        print(f"checkpoint: {path} left as it was (no training step in this run)")
    produced, generation_rate = sample(args, model, corpus.valid)
    train_seconds = trained["seconds"] - done["seconds"]
    summary = {
        "model": args.model,
        "steps": trained["step"],
        "tokens": trained["tokens"],
        "bpc": bpc,
        "sampled": produced,
        "parameters": parameters,
        "threads": threads,
        "train_tokens_per_s": (trained["tokens"] - done["tokens"]) / max(train_seconds, 1e-9),
        "generation_tokens_per_s": generation_rate,
        "peak_memory_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "curve": trained["curve"],
    }
    if args.summary_json:
        Path(args.summary_json).write_text(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
