"""Recurrent inference: per-step latency and streaming-generation throughput.

Run with ``nox -s bench`` or directly: ``python benchmarks/bench_recurrent.py [--quick]``.
Writes the tables to ``docs/benchmarks/recurrent.md``.

1. Per-step latency of the model of fast-transformers' recurrent example (8 layers, 12 heads,
   32-dimensional queries and values, feed-forward 1536, batch 10), linear and full attention,
   at step 10 and step 2000: recurrent-transformer against pytorch-fast-transformers'
   ``RecurrentEncoderBuilder`` in the same process, with the same weights (fast-transformers'
   ``state_dict`` is loaded into ours and the outputs are compared) and the same thread count.
   The state before step 10 comes from 9 real steps; the state before step 2000 is synthesised
   (random tensors of the shapes that 1999 steps leave behind: the cost of a step does not
   depend on the values), the same tensors for both libraries, with our cache at the capacity
   that doubling reaches (2048). From there each library steps on with its own state, as a
   generation loop does: one warm-up step, then the median of ``repeats`` consecutive steps
   (11-31 and 2001-2021 by default), the two libraries alternating at every step. At step 10
   with linear attention, ``torch.compile`` of our model (CPU inductor) joins the alternation
   (``--no-compile`` skips it).
2. Streaming generation (``attention_core.generation.stream``, greedy) with a small
   ``RecurrentLM`` (4 layers, d_model 128), causal-linear against full attention, after a
   prompt of 512 to 8192 tokens consumed by ``prefill``: tokens per second of the steps.

fast-transformers is imported if it is installed; ``--ft-site DIR`` (or the environment
variable ``FT_SITE``) appends a site-packages directory that holds it (built against the same
torch) to ``sys.path``. Without it, only our numbers are reported.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from recurrent_transformer.builders import RecurrentEncoderBuilder
from recurrent_transformer.lm import RecurrentLM
from recurrent_transformer.state import KVCache, LinearState, TransformerState

ROOT = Path(__file__).resolve().parents[1]
SEED_MODEL = dict(
    n_layers=8, n_heads=12, feed_forward_dimensions=1536, query_dimensions=32, value_dimensions=32
)
N, H, E = 10, 12, 32


# peers


def import_fast_transformers(site: str | None):
    """fast-transformers' RecurrentEncoderBuilder, or ``None`` when it cannot be imported."""
    if site:
        sys.path.append(site)
    try:
        from fast_transformers.builders import RecurrentEncoderBuilder as FTBuilder
    except ImportError:
        return None
    return FTBuilder


# part 1: per-step latency


def synthesised_states(attention: str, steps: int, n_layers: int):
    """States after ``steps`` steps for ours and for fast-transformers (same tensors)."""
    g = torch.Generator().manual_seed(0)
    ours, theirs = [], []
    for _ in range(n_layers):
        if attention == "linear":
            S = torch.rand(N, H, E, E, generator=g) * steps
            Z = torch.rand(N, H, E, generator=g) * steps + 1
            ours.append(LinearState(S, Z))
            theirs.append([S.clone(), Z.clone()])
        else:
            keys = torch.randn(N, H, steps, E, generator=g)
            values = torch.randn(N, H, steps, E, generator=g)
            capacity = 1 << steps.bit_length()
            ours.append(KVCache.from_tensors(keys, values, capacity=capacity))
            theirs.append([keys, values])
    return TransformerState(tuple(ours)), theirs


def time_steps(contenders: dict, x, repeats: int) -> dict[str, float]:
    """Median milliseconds of one step for each ``name: (model, state)``, over ``repeats``
    consecutive steps after one warm-up step: each library advances its own state, as a
    generation loop does (nothing is copied outside the timer, and fast-transformers pays
    for its concatenation and our cache for its in-place append). The contenders alternate
    at every step so that load from other jobs hits them alike."""
    states = {name: state for name, (_, state) in contenders.items()}
    times: dict[str, list[float]] = {name: [] for name in contenders}
    with torch.no_grad():
        for name, (model, _) in contenders.items():
            states[name] = model(x, state=states[name])[1]  # warm-up (and compilation)
        for _ in range(repeats):
            for name, (model, _) in contenders.items():
                start = time.perf_counter()
                _, states[name] = model(x, state=states[name])
                times[name].append((time.perf_counter() - start) * 1e3)
    return {name: statistics.median(t) for name, t in times.items()}


def dense_products_ms(model, repeats: int) -> float:
    """Median milliseconds of the model's ``nn.Linear`` products alone, in layer order, on
    random inputs of the step's batch: the part of a step that no attention can avoid."""
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    inputs = [torch.rand(N, m.in_features) for m in linears]
    times = []
    with torch.no_grad():
        for _ in range(repeats + 1):
            start = time.perf_counter()
            for m, x in zip(linears, inputs):
                m(x)
            times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times[1:])


def chained_products_ms(model, repeats: int) -> float:
    """Median milliseconds of the model's dense products run as one
    `attention_core.step_chain.StepChain` call (per layer the stacked query, key and value
    product, the output projection and the two feed-forward products, each a plain product):
    the same weight reads as the step's, without a call from Python per product."""
    from attention_core.step_chain import StepChain

    chain = StepChain(H * E)
    x = chain.input
    for layer in model.layers:
        a = layer.attention
        qkv = torch.cat([a.query_projection.weight, a.key_projection.weight,
                         a.value_projection.weight]).detach()  # fmt: skip
        chain.linear(x, qkv)
        chain.linear(x, a.out_projection.weight.detach())
        hidden = chain.linear(x, layer.linear1.weight.detach())
        x = chain.linear(hidden, layer.linear2.weight.detach())
    inputs = torch.rand(N, H * E)
    times = []
    with torch.no_grad():
        for _ in range(repeats + 1):
            start = time.perf_counter()
            chain(inputs)
            times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times[1:])


class LayerByLayer:
    """``model``'s step with the encoder's chain turned off (each layer called in turn)."""

    def __init__(self, model):
        self.model = model

    def __call__(self, x, state=None):
        import recurrent_transformer.transformers as transformers

        chained = transformers.chained_step
        transformers.chained_step = lambda *args: None
        try:
            return self.model(x, state=state)
        finally:
            transformers.chained_step = chained


def one_thread_note(model, state, x, repeats: int) -> str:
    """The step at 10 and the model's dense products, both with one thread (the floor's
    share differs with the thread count: the products gain from a second core, the per-layer
    calls around them hardly)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        step = time_steps({"ours": (model, state)}, x, repeats)["ours"]
        floor = dense_products_ms(model, repeats)
    finally:
        torch.set_num_threads(threads)
    return (
        f"linear, step 10, with 1 thread: {step:.2f} ms against {floor:.2f} ms for its dense "
        f"products ({step / floor:.2f}x)"
    )


def per_step_latency(
    FTBuilder, repeats: int, long_step: int, compile_step: bool = False
) -> tuple[list[dict], list[str]]:
    rows, notes = [], []
    for attention in ("linear", "full"):
        torch.manual_seed(0)
        ours = RecurrentEncoderBuilder.from_kwargs(attention_type=attention, **SEED_MODEL).get()
        ours.eval()
        ft = None
        if FTBuilder is not None:
            ft = FTBuilder.from_kwargs(attention_type=attention, **SEED_MODEL).get().eval()
            ours.load_state_dict(ft.state_dict())  # the same weights, by the same names
        x = torch.rand(N, H * E)
        # state before step 10: 9 real steps
        with torch.no_grad():
            ours_state, ft_state, a, b = None, None, x, x
            for _ in range(9):
                a, ours_state = ours(a, state=ours_state)
                if ft is not None:
                    b, ft_state = ft(b, state=ft_state)
        if ft is not None:
            notes.append(
                f"{attention}: after 9 steps with fast-transformers' weights, max |ours - theirs| "
                f"= {(a - b).abs().max().item():.1e}"
            )
        long_ours, long_ft = synthesised_states(attention, long_step - 1, SEED_MODEL["n_layers"])
        for step, state_ours, state_ft in (
            (10, ours_state, ft_state),
            (long_step, long_ours, long_ft),
        ):
            contenders = {"ours": (ours, state_ours)}
            if ft is not None:
                contenders["fast-transformers"] = (ft, state_ft)
            compiled = compile_step and attention == "linear" and step == 10
            if compiled:
                contenders["ours, torch.compile"] = (torch.compile(ours), state_ours)
            row = {"attention": attention, "step": step, **time_steps(contenders, x, repeats)}
            if compiled:
                ms = row.pop("ours, torch.compile")
                notes.append(
                    f"linear, step 10, `torch.compile(model)` (CPU inductor, compiled before "
                    f"timing): {ms:.2f} ms against {row['ours']:.2f} ms eager"
                )
            rows.append(row)
            print(row, flush=True)
        if attention == "linear":
            linears = sum(isinstance(m, torch.nn.Linear) for m in ours.modules())
            # the floors are timed alone, so the step is too (the table's steps alternate with
            # fast-transformers', whose 56 MB of weights and Python pass through the caches
            # in between: 1.4-1.7 ms more per step, for either path)
            floor = dense_products_ms(ours, repeats)
            chained = chained_products_ms(ours, repeats)
            alone = {"chained": (ours, ours_state), "layers": (LayerByLayer(ours), ours_state)}
            step10, layers = time_steps(alone, x, repeats).values()
            notes.append(
                f"linear, step 10, timed alone (no other library's step in between): "
                f"{step10:.2f} ms; layer by layer (the encoder's chain turned off): "
                f"{layers:.2f} ms, {layers / step10:.2f}x"
            )
            notes.append(
                f"the model's {linears} dense products alone (its nn.Linear modules in layer "
                f"order, batch {N}, back to back): {floor:.2f} ms; the step at 10 alone takes "
                f"{step10 / floor:.2f}x that"
            )
            notes.append(
                f"the same products as one `StepChain` call (no Python between them): "
                f"{chained:.2f} ms; the step at 10 alone takes {step10 / chained:.2f}x that"
            )
            notes.append(one_thread_note(ours, ours_state, x, repeats))
    return rows, notes


# part 2: streaming generation


def tokens_per_second(model, context: int, new_tokens: int) -> float:
    from attention_core.generation import stream

    prompt = torch.randint(0, model.num_tokens, (1, context), generator=torch.Generator())
    tokens = stream(model, prompt, new_tokens + 1, temperature=0)
    next(tokens)  # prefill and the first token
    start = time.perf_counter()
    count = sum(1 for _ in tokens)
    return count / (time.perf_counter() - start)


def generation(contexts: list[int], new_tokens: int) -> list[dict]:
    models = {}
    for attention in ("causal-linear", "full"):
        torch.manual_seed(0)
        models[attention] = RecurrentLM(
            num_tokens=256,
            n_layers=4,
            n_heads=4,
            query_dimensions=32,
            value_dimensions=32,
            attention_type=attention,
        ).eval()
    rows = []
    with torch.no_grad():
        # the two models alternate at each context so that load from other jobs hits them alike
        for context in contexts:
            for attention, model in models.items():
                row = {
                    "attention": attention,
                    "context": context,
                    "tokens/s": tokens_per_second(model, context, new_tokens),
                }
                rows.append(row)
                print(row, flush=True)
    return rows


# report


def markdown(latency, notes, gen, args, have_ft: bool) -> str:
    lines = [
        f"Generated by `python benchmarks/bench_recurrent.py{' --quick' if args.quick else ''}` on "
        f"{datetime.date.today().isoformat()}: torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, {platform.processor() or platform.machine()}, "
        "float32, CPU. Medians; absolute numbers vary between runs: read the ratios.",
        "",
        "### Per-step latency of fast-transformers' recurrent example",
        "",
        "The model of fast-transformers' recurrent-model example: 8 layers, 12 heads, "
        "32-dimensional queries and values, feed-forward 1536, batch 10, "
        "under `torch.no_grad()`. Each library steps on from the state before the given step "
        "with its own state (one warm-up step, then the median of "
        f"{args.repeats} consecutive steps, the libraries alternating), as a generation loop "
        "does. Milliseconds per step (lower is better).",
        "",
    ]
    if have_ft:
        lines += [
            "| attention | step | recurrent-transformer (ms) | fast-transformers (ms) | ratio |",
            "| --- | ---: | ---: | ---: | ---: |",
        ]
        for r in latency:
            ratio = r["ours"] / r["fast-transformers"]
            lines.append(
                f"| {r['attention']} | {r['step']} | {r['ours']:.2f} | "
                f"{r['fast-transformers']:.2f} | {ratio:.2f} |"
            )
        lines += [""] + [f"- {note}" for note in notes]
    else:
        lines += [
            "fast-transformers was not importable in this run: our numbers alone.",
            "",
            "| attention | step | recurrent-transformer (ms) |",
            "| --- | ---: | ---: |",
        ]
        lines += [f"| {r['attention']} | {r['step']} | {r['ours']:.2f} |" for r in latency]
    lines += [
        "",
        "### Streaming generation",
        "",
        "`RecurrentLM` (4 layers, 4 heads of 32, d_model 128, vocabulary 256), batch 1, greedy "
        f"`attention_core.generation.stream`: {args.new_tokens} new tokens after a prompt of the "
        "given length (consumed by one `prefill`). Tokens per second (higher is better).",
        "",
        "| context | causal-linear (tokens/s) | full (tokens/s) | linear / full |",
        "| ---: | ---: | ---: | ---: |",
    ]
    by = {(r["attention"], r["context"]): r["tokens/s"] for r in gen}
    for context in sorted({r["context"] for r in gen}):
        linear, full = by[("causal-linear", context)], by[("full", context)]
        lines.append(f"| {context} | {linear:.0f} | {full:.0f} | {linear / full:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats and shorter contexts")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--ft-site", default=os.environ.get("FT_SITE"))
    parser.add_argument("--new-tokens", type=int, default=None)
    parser.add_argument(
        "--no-compile", action="store_true", help="skip timing torch.compile(model) on the step"
    )
    parser.add_argument("--out", default=str(ROOT / "docs" / "benchmarks" / "recurrent.md"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    FTBuilder = import_fast_transformers(args.ft_site)
    repeats = args.repeats = 3 if args.quick else 21
    long_step = 500 if args.quick else 2000
    contexts = [256, 1024] if args.quick else [512, 1024, 2048, 4096, 8192]
    args.new_tokens = args.new_tokens or (8 if args.quick else 32)
    latency, notes = per_step_latency(FTBuilder, repeats, long_step, not args.no_compile)
    gen = generation(contexts, args.new_tokens)
    report = markdown(latency, notes, gen, args, FTBuilder is not None)
    print(report)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(report)


if __name__ == "__main__":
    main()
