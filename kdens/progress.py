"""What a training run shows while it runs: bars on a terminal, plain lines in a log.

On a terminal: one bar over the epochs and, once an epoch has run longer than
``STEP_BAR_AFTER_S`` seconds (or the previous one did), a second bar over that epoch's
steps with its ETA, so a minutes-long epoch is never a frozen screen. When the stream is
not a terminal (a log file, CI, a pipe), bars would fill it with carriage returns: it
gets one line per epoch instead, plus a line every ``LINE_EVERY_S`` seconds inside a long
epoch. ``--quiet`` (``enabled=False``) shows nothing; so does ``TQDM_DISABLE=1``.
"""

from __future__ import annotations

import os
import sys
import time
from typing import TextIO

STEP_BAR_AFTER_S = 3.0
"""An epoch running longer than this gets a step-level bar (on a terminal)."""
LINE_EVERY_S = 30.0
"""Inside a long epoch, a log (not a terminal) gets a progress line this often."""


def _disabled_by_env() -> bool:
    return os.environ.get("TQDM_DISABLE", "").lower() not in ("", "0", "false", "no")


def on_terminal(stream: TextIO | None = None) -> bool:
    """Whether ``stream`` (stderr, where progress goes) is a terminal that can redraw a bar."""
    stream = stream if stream is not None else sys.stderr
    return bool(getattr(stream, "isatty", lambda: False)())


def mode(enabled: bool = True, stream: TextIO | None = None) -> str:
    """How progress is shown on ``stream`` (stderr): "bar" on a terminal, "lines" in a log, "off"."""
    if not enabled or _disabled_by_env():
        return "off"
    return "bar" if on_terminal(stream) else "lines"


class Progress:
    """Progress of one ``fit``: call ``start_epoch``, ``step`` after each step, ``end_epoch``, ``close``."""

    def __init__(self, desc: str, epochs: int, start_epoch: int, steps_per_epoch: int, enabled: bool = True,
                 stream: TextIO | None = None):
        self.desc, self.epochs, self.steps = desc, epochs, max(1, steps_per_epoch)
        self.stream = stream if stream is not None else sys.stderr
        self.mode = mode(enabled, self.stream)
        self._epoch_bar = self._step_bar = None
        self._epoch = start_epoch
        self._t_epoch = self._t_line = time.perf_counter()
        self._long = False  # the previous epoch ran longer than STEP_BAR_AFTER_S
        if self.mode == "bar":
            from tqdm.auto import tqdm
            self._tqdm = tqdm
            self._epoch_bar = tqdm(total=epochs, initial=start_epoch, desc=desc, unit="epoch", dynamic_ncols=True,
                                   leave=True, mininterval=0.5, file=self.stream)

    def start_epoch(self, epoch: int) -> None:
        self._epoch = epoch
        self._t_epoch = self._t_line = time.perf_counter()
        if self.mode == "bar" and self._long:
            self._open_step_bar(0)

    def step(self, step: int) -> None:
        """After step ``step`` (0-based) of the current epoch; cheap when nothing is due."""
        if self.mode == "off":
            return
        now = time.perf_counter()
        if self.mode == "bar":
            if self._step_bar is None:
                if now - self._t_epoch > STEP_BAR_AFTER_S:
                    self._open_step_bar(step + 1)
            else:
                self._step_bar.update(1)
        elif now - self._t_line >= LINE_EVERY_S:
            self._t_line = now
            done = step + 1
            left = (now - self._t_epoch) / done * (self.steps - done)
            self._line(f"{self.desc}: epoch {self._epoch + 1}/{self.epochs}  step {done}/{self.steps}  "
                       f"{now - self._t_epoch:.0f} s, about {left:.0f} s left in this epoch")

    def end_epoch(self, rec: dict) -> None:
        seconds = time.perf_counter() - self._t_epoch
        self._long = seconds > STEP_BAR_AFTER_S
        shown = {"loss": rec.get("train_loss"), "val_loss": rec.get("val_loss"), "val_acc": rec.get("val_accuracy")}
        if self.mode == "bar":
            self._close_step_bar()
            self._epoch_bar.set_postfix({k: f"{v:.4f}" for k, v in shown.items() if v is not None}, refresh=False)
            self._epoch_bar.update(1)
        elif self.mode == "lines":
            stats = "  ".join(f"{k}={v:.4f}" for k, v in shown.items() if v is not None)
            self._line(f"{self.desc}: epoch {rec['epoch']}/{self.epochs}  {stats}  {seconds:.1f} s")

    def close(self) -> None:
        self._close_step_bar()
        if self._epoch_bar is not None:
            self._epoch_bar.close()
            self._epoch_bar = None

    def _open_step_bar(self, initial: int) -> None:
        self._step_bar = self._tqdm(total=self.steps, initial=initial, unit="step", leave=False, position=1,
                                    desc=f"  epoch {self._epoch + 1}/{self.epochs}", dynamic_ncols=True,
                                    mininterval=0.5, file=self.stream)

    def _close_step_bar(self) -> None:
        if self._step_bar is not None:
            self._step_bar.close()
            self._step_bar = None

    def _line(self, text: str) -> None:
        print(text, file=self.stream, flush=True)
