"""Per-token generation time against the context length, for every model family of this
project: the causal-linear and full-attention recurrent LMs (recurrent-transformer), the
Block-Recurrent Transformer and the Feedback Transformer. Run by ``nox -s bench`` or directly
(``--quick`` for a short run).

Each model (about d=128, 2-4 layers, batch 1, float32, same threads) consumes a random prompt
of the given length through its ``prefill`` (one parallel pass where the model has one), then
takes ``--new-tokens`` greedy steps through ``step``; the table gives the median milliseconds
per step. A constant-cost model gives a flat row; the full-attention LM grows with the context
(its key/value cache is read at every step). Writes ``docs/benchmarks/generation.md`` and the
rows as ``docs/benchmarks/generation.json`` for ``benchmarks/plot_results.py``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
VOCAB = 256


def models() -> dict[str, torch.nn.Module]:
    """The contenders, built with seed 0, in eval mode."""
    from block_recurrent_transformer import BlockRecurrentTransformer
    from feedback_transformer import FeedbackTransformer
    from recurrent_transformer.lm import RecurrentLM

    built = {}
    for attention in ("causal-linear", "full"):
        torch.manual_seed(0)
        built[f"recurrent LM ({attention}), d=128 depth 4"] = RecurrentLM(
            VOCAB, n_layers=4, n_heads=4, query_dimensions=32, value_dimensions=32,
            attention_type=attention,
        )  # fmt: skip
    torch.manual_seed(0)
    built["block-recurrent (W=128), d=128 depth 2"] = BlockRecurrentTransformer(
        num_tokens=VOCAB, dim=128, depth=2, dim_head=32, heads=4, max_seq_len=512,
        block_width=128, num_state_vectors=128, recurrent_layers=(2,),
    )  # fmt: skip
    torch.manual_seed(0)
    built["feedback (mem_len=1024), d=128 depth 2"] = FeedbackTransformer(
        num_tokens=VOCAB, dim=128, depth=2, seq_len=1, mem_len=1024, dim_head=32, heads=4
    )
    return {name: model.eval() for name, model in built.items()}


@torch.no_grad()
def ms_per_token(model, context: int, new_tokens: int) -> float:
    """Median milliseconds of one ``step`` after a ``context``-token prompt."""
    prompt = torch.randint(0, VOCAB, (1, context), generator=torch.Generator().manual_seed(0))
    logits, state = model.prefill(prompt)
    times = []
    for _ in range(new_tokens):
        token = logits.argmax(-1)
        start = time.perf_counter()
        logits, state = model.step(token, state)
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="contexts 256 and 1024, 8 tokens")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--output", type=Path, default=ROOT / "docs/benchmarks/generation.md")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    contexts = [256, 1024] if args.quick else [256, 1024, 2048, 4096, 8192]
    new_tokens = 8 if args.quick else args.new_tokens
    contenders = models()
    rows = []
    for context in contexts:  # contenders alternate at each context: load hits them alike
        for name, model in contenders.items():
            ms = ms_per_token(model, context, new_tokens)
            rows.append({"model": name, "context": context, "ms_per_token": ms})
            print(f"{name:28s} context {context:5d}: {ms:7.2f} ms/token", flush=True)
    names = list(contenders)
    lines = [
        f"Per-token generation time (ms, median of {new_tokens} greedy steps after a prompt of "
        f"the given length), batch 1, float32, {args.threads} threads, torch "
        f"{torch.__version__}. Command: `python benchmarks/bench_generation.py "
        f"{' '.join(sys.argv[1:] if argv is None else argv)}`.".replace(" `.", "`."),
        "",
        "| context | " + " | ".join(names) + " |",
        "| ---: | " + " | ".join("---:" for _ in names) + " |",
    ]
    for context in contexts:
        cells = [f"{r['ms_per_token']:.2f}" for r in rows if r["context"] == context]
        lines.append(f"| {context} | " + " | ".join(cells) + " |")
    table = "\n".join(lines) + "\n"
    print(table)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(table)
    args.output.with_suffix(".json").write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
