"""The demo's checkpoints: the model, the optimizer, the step, the batch generator's state, and
what the run must match to continue from it (the corpus's identity and the options).

``--resume`` refuses a checkpoint of another corpus or with other model options (the weights
would not fit, or would silently continue on other text), and warns when only a training
option (batch size, learning rate) changed.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

#: options that fix the model's shapes or its function: a change makes the checkpoint
#: unusable (``seq_len``: the Feedback Transformer's window, ``None`` for other families)
MODEL_OPTIONS = ("model", "dim", "depth", "window", "seq_len")
#: the window of a feedback checkpoint written before the demo stored ``seq_len``
FORMER_FEEDBACK_SEQ_LEN = 8
#: options of the training loop: a change is allowed, with a warning
TRAINING_OPTIONS = ("batch", "lr")


def default_path(model: str, corpus_name: str) -> Path:
    """``runs/demo-<model>-<corpus>.pt``: runs on different corpora never share a file."""
    return Path("runs") / f"demo-{model}-{corpus_name}.pt"


def save(
    path: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    generator: torch.Generator,
    *,
    options: dict,
    corpus: dict,
    step: int,
    tokens: int,
    seconds: float,
) -> None:
    """Write a checkpoint that :func:`resume` can continue from."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(
        {
            "options": options,
            "corpus": corpus,
            "model_state": model.state_dict(),
            "optimizer_state": optimizer.state_dict(),
            "generator_state": generator.get_state(),
            "step": step,
            "tokens": tokens,
            "seconds": seconds,
        },
        path,
    )


def resume(
    path: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    generator: torch.Generator,
    *,
    options: dict,
    corpus: dict,
) -> dict:
    """Load ``path`` into ``model``, ``optimizer`` and ``generator`` after checking that it
    was trained on ``corpus`` with the model ``options``; returns its step, tokens and
    seconds. Exits with a one-line message on a mismatch."""
    if not path.is_file():
        raise SystemExit(f"--resume: no checkpoint at {path}")
    saved = torch.load(path, weights_only=True)
    if "corpus" not in saved:
        raise SystemExit(f"--resume: {path} is from an older demo (no corpus identity); retrain")
    if saved["corpus"] != corpus:
        raise SystemExit(
            f"--resume: {path} was trained on {_describe(saved['corpus'])}, not on "
            f"{_describe(corpus)}; pass the same --data/--max-bytes or another --checkpoint"
        )
    if "seq_len" not in saved["options"]:
        former = FORMER_FEEDBACK_SEQ_LEN if saved["options"].get("model") == "feedback" else None
        saved["options"]["seq_len"] = former
    for keys, fatal in ((MODEL_OPTIONS, True), (TRAINING_OPTIONS, False)):
        was = {k: saved["options"].get(k) for k in keys}
        now = {k: options[k] for k in keys}
        if was != now and fatal:
            raise SystemExit(f"--resume: {path} holds a model with {was}, not {now}")
        if was != now:
            print(f"warning: {path} was trained with {was}; continuing with {now}")
    model.load_state_dict(saved["model_state"])
    optimizer.load_state_dict(saved["optimizer_state"])
    for group in optimizer.param_groups:  # --lr applies to the continued run
        group["lr"] = options["lr"]
    generator.set_state(saved["generator_state"])
    return {k: saved[k] for k in ("step", "tokens", "seconds")}


def _describe(corpus: dict) -> str:
    return f"{corpus['source']} ({corpus['bytes']:,} bytes, sha256 {corpus['sha256'][:12]})"
