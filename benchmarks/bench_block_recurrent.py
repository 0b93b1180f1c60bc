"""Block-Recurrent Transformer: training throughput, activation memory and generation speed,
block-recurrent-transformer against block-recurrent-transformer-pytorch 0.4.4.

Run with ``nox -s bench`` or directly: ``python benchmarks/bench_block_recurrent.py [--quick]``.
Writes the table to ``docs/benchmarks/block_recurrent.md`` and the numbers to
``block_recurrent.json`` beside it (for ``benchmarks/plot_results.py``).

Two configurations (8 heads of 64, vocabulary 256, max_seq_len 512, float32, two threads,
``num_state_vectors = block_width``, one recurrent layer at ``depth // 2``, every layer
attending into the previous block, rotary positions):

* ``d256-W128``: dim 256, depth 4, block width W = 128;
* ``d128-W256``: dim 128, depth 2, W = 256.

Three contenders per configuration, in one process:

* ``peer``: block-recurrent-transformer-pytorch (multi-query keys/values, tokens see W + 1 .. 2W
  keys, state cross-attention over the current block only, fixed gate);
* ``ours (peer options)``: the same choices (``kv_heads=1, sliding_window=False,
  state_attends_previous_block=False``);
* ``ours (paper defaults)``: multi-head keys/values, a window of exactly W keys, state
  cross-attention over the previous and the current block (more work than the peer).

Measured: tokens per second of a training forward (grad enabled) and of forward+backward of the
next-token loss on a batch of 2 x 512 tokens; the peak memory of training, measured as the bytes
of the tensors saved for the backward (activation memory, counted with
``torch.autograd.graph.saved_tensors_hooks``, each storage once; parameters and their
gradients, equal in size for all contenders, are not counted); and generation: tokens per second
of ``RecurrentTrainerWrapper.generate`` after a prompt of 256 tokens (the whole call, prompt
included; the peer re-runs the window for every token, ours takes one cached step per token).

The peer is imported if it is installed (``pip install --no-deps
block-recurrent-transformer-pytorch==0.4.4 beartype``); without it, only our numbers are
reported.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
from pathlib import Path

import torch
from timing import interleaved_medians

from block_recurrent_transformer import BlockRecurrentTransformer, RecurrentTrainerWrapper

ROOT = Path(__file__).resolve().parents[1]
COMMON = dict(num_tokens=256, dim_head=64, heads=8, max_seq_len=512)
CONFIGS = {
    "d256-W128": dict(COMMON, dim=256, depth=4, block_width=128, num_state_vectors=128),
    "d128-W256": dict(COMMON, dim=128, depth=2, block_width=256, num_state_vectors=256),
}
PEER_OPTIONS = dict(kv_heads=1, sliding_window=False, state_attends_previous_block=False)
BATCH = 2


def import_peer():
    """block-recurrent-transformer-pytorch's classes, or ``None`` when it is not installed."""
    try:
        from block_recurrent_transformer_pytorch import (
            BlockRecurrentTransformer as PeerTransformer,
        )
        from block_recurrent_transformer_pytorch import (
            RecurrentTrainerWrapper as PeerWrapper,
        )
    except ImportError:
        return None
    return PeerTransformer, PeerWrapper


def contenders(peer, config: dict) -> dict[str, tuple[torch.nn.Module, type]]:
    """name -> (model, wrapper class) for one configuration."""
    out = {}
    recurrent = (max(1, config["depth"] // 2),)
    if peer is not None:
        torch.manual_seed(0)
        out["peer 0.4.4"] = (peer[0](**config, recurrent_layers=recurrent), peer[1])
    torch.manual_seed(0)
    out["ours (peer options)"] = (
        BlockRecurrentTransformer(**config, recurrent_layers=recurrent, **PEER_OPTIONS),
        RecurrentTrainerWrapper,
    )
    torch.manual_seed(0)
    out["ours (paper defaults)"] = (
        BlockRecurrentTransformer(**config, recurrent_layers=recurrent),
        RecurrentTrainerWrapper,
    )
    return out


# measurements


def loss_of(model, seq):
    return model(seq, return_loss=True)[0]


def saved_bytes(model, seq) -> int:
    """Bytes of the distinct storages saved for the backward of the loss."""
    storages = {}

    def pack(t):
        s = t.untyped_storage()
        storages[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = loss_of(model, seq)
    del loss
    return sum(storages.values())


def training(models, config: dict, repeats: int) -> dict[str, dict]:
    seq = torch.randint(0, config["num_tokens"], (BATCH, config["max_seq_len"] + 1))
    tokens = BATCH * config["max_seq_len"]
    forwards, backwards = {}, {}
    for name, (model, _) in models.items():
        model.train()
        forwards[name] = lambda model=model: loss_of(model, seq)

        def forward_backward(model=model):
            model.zero_grad(set_to_none=True)
            loss_of(model, seq).backward()

        backwards[name] = forward_backward
    fwd = interleaved_medians(forwards, repeats)
    bwd = interleaved_medians(backwards, repeats)
    return {
        name: dict(
            forward=tokens / fwd[name],
            forward_backward=tokens / bwd[name],
            saved_mib=saved_bytes(model, seq) / 2**20,
        )
        for name, (model, _) in models.items()
    }


def generation(
    models, config: dict, prompt: int, new_tokens: int, repeats: int
) -> dict[str, float]:
    prime = torch.randint(0, config["num_tokens"], (1, prompt))
    runs = {}
    for name, (model, wrapper_cls) in models.items():
        wrapper = wrapper_cls(model).eval()

        def run(wrapper=wrapper):
            with torch.no_grad():
                wrapper.generate(prime, prompt + new_tokens)

        runs[name] = run
    return {name: new_tokens / t for name, t in interleaved_medians(runs, repeats).items()}


# report


def markdown(results: dict, args, have_peer: bool) -> str:
    """The report: one table row per configuration and contender."""
    base = "peer 0.4.4" if have_peer else None
    lines = [
        f"`python benchmarks/bench_block_recurrent.py{' --quick' if args.quick else ''}` on "
        f"{datetime.date.today()}, {platform.processor() or platform.machine()}, torch "
        f"{torch.__version__}, {torch.get_num_threads()} threads, float32. Medians of "
        f"{args.repeats} runs; absolute numbers vary between runs: read the ratios.",
        "",
        "Configurations: `d256-W128` = dim 256, depth 4, block width 128, 128 state vectors, "
        "recurrent layer 2; `d128-W256` = dim 128, depth 2, block width 256, 256 state "
        "vectors, recurrent layer 1. "
        "Both: 8 heads x 64, max_seq_len 512, vocabulary 256. Training: "
        "batch 2 x 512 tokens, next-token loss. Memory: bytes of the tensors saved for the "
        "backward of one training forward (activations; parameters not counted). Generation: "
        f"batch 1, prompt 256, {args.new_tokens} new tokens, whole `generate` call.",
        "",
        "| config | contender | fwd tok/s | fwd+bwd tok/s | saved for backward (MiB) "
        "| generation tok/s |",
        "|---|---|---:|---:|---:|---:|",
    ]

    def ratio(value, reference):
        return f" ({value / reference:.2f}x)" if reference else ""

    for config, (train, gen) in results.items():
        ref = train.get(base) if base else None
        gref = gen.get(base) if base else None
        for name, row in train.items():
            lines.append(
                f"| {config} | {name} "
                f"| {row['forward']:,.0f}{ratio(row['forward'], ref and ref['forward'])} "
                f"| {row['forward_backward']:,.0f}"
                f"{ratio(row['forward_backward'], ref and ref['forward_backward'])} "
                f"| {row['saved_mib']:,.1f}{ratio(row['saved_mib'], ref and ref['saved_mib'])} "
                f"| {gen[name]:,.1f}{ratio(gen[name], gref)} |"
            )
    lines += [
        "",
        "Ratios are against the peer (higher is better for tokens/s, lower for memory). "
        "'ours (peer options)' makes the peer's choices (multi-query keys/values, W + 1 .. 2W "
        "keys per token, state cross-attention over the current block); 'ours (paper "
        "defaults)' uses 8 key/value heads, exactly W keys per token and state "
        "cross-attention over the previous and the current block, so it does more work.",
    ]
    if not have_peer:
        lines += ["", "block-recurrent-transformer-pytorch is not installed: ours only."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats and tokens")
    parser.add_argument("--out", default=str(ROOT / "docs" / "benchmarks" / "block_recurrent.md"))
    args = parser.parse_args(argv)
    args.repeats = 3 if args.quick else 5
    args.new_tokens = 32 if args.quick else 128
    torch.set_num_threads(2)
    peer = import_peer()
    results = {}
    for config_name, config in CONFIGS.items():
        models = contenders(peer, config)
        train = training(models, config, args.repeats)
        gen = generation(models, config, 256, args.new_tokens, 1 if args.quick else 3)
        results[config_name] = (train, gen)
        del models
    report = markdown(results, args, peer is not None)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(report)
    print(report)
    numbers = {
        config: {name: dict(row, generation=gen[name]) for name, row in train.items()}
        for config, (train, gen) in results.items()
    }
    out.with_suffix(".json").write_text(json.dumps(numbers, indent=1) + "\n")


if __name__ == "__main__":
    main()
