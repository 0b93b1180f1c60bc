"""Run the fast-transformers documentation examples end to end: ``python -m attention_core.demo``.

First the BERT-like encoder of the fast-transformers quick start, exactly as written there
(with the import prefix ``attention_core``), then the same builder with every registered
attention type on a causal or non-causal input, printing output statistics and timings.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import torch

from .attention_registry import AttentionRegistry
from .builders import TransformerEncoderBuilder
from .masking import TriangularCausalMask

CAUSAL = {"causal-linear", "causal-improved-clustered"}
EXTRA: dict[str, dict[str, Any]] = {
    "local": {"local_context": 32},
    "clustered": {"clusters": 16},
    "improved-clustered": {"clusters": 16, "topk": 16},
    "causal-improved-clustered": {"clusters": 16, "topk": 16},
    "reformer": {"chunk_size": 32},
    "exact-topk": {"topk": 16},
    "aft-full": {"max_sequence_length": 512},
}


def quick_start() -> None:
    """The quick-start example of the fast-transformers documentation, as written there."""
    print("== quick start: BERT-like encoder (12 layers, 12 heads, full attention)")
    start = time.perf_counter()
    # --- fast-transformers' quick start (fast_transformers -> attention_core) ---
    bert = TransformerEncoderBuilder.from_kwargs(
        n_layers=12,
        n_heads=12,
        query_dimensions=64,
        value_dimensions=64,
        feed_forward_dimensions=3072,
        attention_type="full",  # change this to use another
        # attention implementation
        activation="gelu",
    ).get()

    y = bert(
        torch.rand(
            10,  # batch_size
            512,  # sequence length
            64 * 12,  # features
        )
    )
    # --- end of the quick start ---
    print(
        f"   output {tuple(y.shape)}, finite: {bool(torch.isfinite(y).all())}, "
        f"{time.perf_counter() - start:.1f} s"
    )


def every_attention(length: int) -> None:
    """Build the same small encoder with each registered attention type."""
    print(f"== every attention type: 2 layers, 4 heads, batch 2, length {length}")
    x = torch.rand(2, length, 4 * 32)
    for name in AttentionRegistry.keys:
        extra: dict[str, Any]
        if name == "conditional-full":
            attention_type, extra = "conditional-full:linear", {"length_limit": length // 2}
        else:
            attention_type, extra = name, EXTRA.get(name, {})
        model = TransformerEncoderBuilder.from_kwargs(
            n_layers=2,
            n_heads=4,
            query_dimensions=32,
            value_dimensions=32,
            feed_forward_dimensions=256,
            attention_type=attention_type,
            **extra,
        ).get()
        model.eval()
        mask = TriangularCausalMask(length) if name in CAUSAL else None
        with torch.no_grad():
            model(x, attn_mask=mask)  # warm-up: first calls pay one-time dispatch costs
            start = time.perf_counter()
            y = model(x, attn_mask=mask)
        elapsed = (time.perf_counter() - start) * 1e3
        print(f"   {attention_type:28s} {elapsed:8.1f} ms   output std {y.std().item():.3f}")


def main(argv: list[str] | None = None) -> None:
    """Entry point of ``python -m attention_core.demo``."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--length", type=int, default=512, help="sequence length of part 2")
    parser.add_argument("--skip-quick-start", action="store_true")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    if not args.skip_quick_start:
        quick_start()
    every_attention(args.length)


if __name__ == "__main__":
    main()
