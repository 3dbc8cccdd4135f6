"""The persistent kernel's error flag, seen from the host without a host sync (docs/persistent.md, Watchdog).

After each launch (eager) or each replay of a CUDA graph that contains one, :meth:`FlagWatch.record` queues an
asynchronous copy of the device flag into ONE pinned host word behind ONE event (both made on the first record,
then reused: nothing is allocated per launch); :meth:`FlagWatch.tripped` reads that word once the event has
completed. Nothing waits on the device: a trip is reported by the first call after the copy has landed.
"""

from __future__ import annotations

import torch

from ..._device import capturing


class FlagWatch:
    """Watches ``flag`` (int32 ``[1]``, 0 = fine) for the host.

    A CPU flag (the interpreter) is read directly: a CPU read is no device sync. ``host`` / ``event`` (tests):
    a ready-made host word and an object with ``record()`` / ``query()``, used instead of pinned memory and a
    ``torch.cuda.Event``. Inside a CUDA-graph capture :meth:`record` does nothing (the copy would be captured but
    an ordinary event record is not a graph node): whoever replays the graph records after each replay."""

    def __init__(self, flag: torch.Tensor, *, host: torch.Tensor | None = None, event=None):
        self.flag = flag
        self._host, self._event = host, event
        self._live = event is None and not flag.is_cuda
        self._recorded = False

    def record(self) -> None:
        """Queue the flag's copy behind the work queued so far on the current stream of the flag's device (no sync,
        no allocation after the first call). That device's stream, not the current device's: the copy runs there,
        and an event recorded on another device's stream would complete without waiting for it (the host would read
        the word before the flag landed)."""
        if not self._live:
            if self.flag.is_cuda and capturing(self.flag.device):
                return
            if self._event is None:
                with torch.inference_mode(False):  # written by every later record(), in the mode or not
                    self._host = torch.empty(1, dtype=self.flag.dtype, pin_memory=True)
                self._event = torch.cuda.Event()
            self._host.copy_(self.flag, non_blocking=True)
            if self.flag.is_cuda:
                self._event.record(torch.cuda.current_stream(self.flag.device))
            else:  # (a test's CPU flag with a ready-made event)
                self._event.record()
        self._recorded = True

    def tripped(self) -> int:
        """The flag as of the latest recorded launch once its copy has landed; 0 before that, if none, or inside a
        capture."""
        if not self._recorded:
            return 0
        if self._live:
            return int(self.flag.tolist()[0])  # the CPU's own flag
        if self.flag.is_cuda and capturing(self.flag.device):
            return 0  # an event query is not allowed while a stream captures: the replays check
        if not self._event.query():
            return 0  # still in flight: the next call looks again
        return int(self._host.tolist()[0])  # host memory: no device read

    def clear(self) -> None:
        """Forget what was recorded (after the flag was zeroed: the next launch records afresh)."""
        self._recorded = False
