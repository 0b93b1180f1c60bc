"""The demo's progress bar: steps of ``--steps``, or seconds of ``--minutes`` (so the bar has a
total and an ETA either way), with the training loss in bits per character and tokens/s.

tqdm is imported only when the bar is shown: ``--no-progress`` runs without it.
"""

from __future__ import annotations

import sys


class Progress:
    """A tqdm bar over ``steps`` steps or ``seconds`` of training (whichever is given).

    Arguments:
        steps: the step budget, or ``None``.
        seconds: the time budget when ``steps`` is ``None``.
        disabled: no bar (and no tqdm import).
    """

    def __init__(self, steps: int | None, seconds: float | None, disabled: bool = False):
        self.by_time = steps is None
        self.last = 0.0
        self.bar = None
        if disabled:
            return
        try:
            from tqdm.auto import tqdm
        except ImportError:
            raise SystemExit(
                "the progress bar needs tqdm: pip install -r examples/requirements.txt "
                "(or pass --no-progress)"
            ) from None
        if self.by_time:
            self.bar = tqdm(
                total=round(seconds or 0.0, 1), unit="s", file=sys.stdout,
                bar_format="{l_bar}{bar}| {n:.0f}/{total:.0f} s [{elapsed}<{remaining}{postfix}]",
            )  # fmt: skip
        else:
            self.bar = tqdm(total=steps, unit="step", file=sys.stdout)

    def update(self, step: int, seconds: float, loss_bits: float, tokens_per_s: float) -> None:
        """After a step: ``seconds`` of training so far in this run, the loss in bits."""
        if self.bar is None:
            return
        if self.by_time:
            advance = min(seconds, self.bar.total) - self.last
            self.last += advance
            self.bar.update(advance)
        else:
            self.bar.update()
        self.bar.set_postfix_str(
            f"step {step}, loss {loss_bits:.3f} bits/char, {tokens_per_s:,.0f} tok/s", refresh=False
        )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
