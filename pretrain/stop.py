"""Stopping early at a step boundary that every rank agrees on, so that a job can save a
checkpoint and be requeued: Slurm's warning before the time limit (`--signal=B:USR1@S`,
forwarded to the tasks by slurm/ scripts) and SIGTERM (preemption, scancel).

A signal only sets a flag. After each step the ranks take the maximum of their flags (one
all-reduce of one number, as Megatron-LM's --exit-signal-handler does), so all of them
stop after the same step even when the signal reached them at different moments.
"""

from __future__ import annotations

import signal
import threading

import parallel

STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)
EXIT_REQUEUE = 75  # EX_TEMPFAIL: stopped before train.steps with a checkpoint; requeue to go on


class StopSignals:
    """Install with `with StopSignals() as stop:`; `stop.agreed()` after each step."""

    def __init__(self, signals=STOP_SIGNALS):
        self.signals, self.received, self._previous = signals, None, {}

    def __enter__(self) -> StopSignals:
        parallel.start_writer_helpers(self.signals)  # before the handlers: children ignore them
        if threading.current_thread() is not threading.main_thread():
            return self  # Python takes signal handlers in the main thread only: no early stop
        for number in self.signals:
            self._previous[number] = signal.signal(number, self._note)
        return self

    def __exit__(self, *exc) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)

    def _note(self, number, frame) -> None:
        self.received = signal.Signals(number).name

    def agreed(self) -> bool:
        """True on every rank once any rank has received a stop signal (collective)."""
        return parallel.any_rank(self.received is not None)
