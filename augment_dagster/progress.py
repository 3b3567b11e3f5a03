"""Progress of the long loops (diffusion units, textual inversion, classifier training, partitions), no Dagster.

In a terminal (stderr is a tty): a tqdm bar per stage. Outside one (CI, nohup, Dagster's compute logs): a plain
line at least every ``every_s`` seconds (default 30) naming the asset, partition, units done/total and the ETA,
written to stderr and to the ``augment_dagster.progress`` logger:

    [progress] demo/synthetic/dafusion [2shot-s0]: 96/288 img (33%), 41s elapsed, ETA 1m22s

The asset and partition come from a *scope provider* the Dagster layer registers (``defs/assets/common.py``: the
current asset execution context), so the algorithms only say what they count: ``bar = progress_bar(n, "img")``.
A heartbeat thread makes the "at least every 30 s" hold even while one unit takes longer than that.
"""
from __future__ import annotations

import logging
import os
import sys
import threading
import time
from typing import Callable

log = logging.getLogger("augment_dagster.progress")

EVERY_S = float(os.environ.get("AUGMENT_PROGRESS_EVERY_S", "30"))  # the non-tty line interval
_scope_provider: Callable[[], tuple[str | None, str | None]] | None = None
_last_line = [0.0]  # monotonic time of the last line any reporter emitted (for outer heartbeats)


def _wake_s(every_s: float) -> float:
    """How often a heartbeat thread wakes to check: 1-5 s. With ``every_s`` 0 ("a line on every update") a
    thread that waited ``every_s`` would spin and take the GIL from the run it reports on."""
    return min(max(every_s, 1.0), 5.0)


def register_scope_provider(fn: Callable[[], tuple[str | None, str | None]] | None) -> None:
    """``fn() -> (asset, partition)`` of the running step, or ``(None, None)`` outside one."""
    global _scope_provider
    _scope_provider = fn


def current_scope() -> tuple[str | None, str | None]:
    if _scope_provider is None:
        return None, None
    try:
        return _scope_provider()
    except Exception:  # noqa: BLE001 - progress must never break the work it reports on
        return None, None


def fmt_secs(s: float | None) -> str:
    if s is None or s != s or s == float("inf"):
        return "?"
    s = int(round(s))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{(s % 3600) // 60:02d}m"


def eta(done: int, total: int, elapsed: float) -> float | None:
    """Remaining seconds at the mean rate so far; None before the first unit."""
    if done <= 0 or total <= 0:
        return None
    return max(0.0, elapsed / done * (total - done))


def stderr_line(line: str) -> None:
    if _is_tty():  # above any open bar instead of through it
        from tqdm.auto import tqdm

        tqdm.write(line, file=sys.stderr)
    else:
        print(line, file=sys.stderr, flush=True)
    log.info(line)


def _is_tty() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


class Progress:
    """``update(n)`` as units finish, ``close()`` at the end (or use it as a context manager).

    ``tty=None`` decides by ``sys.stderr.isatty()``. Lines (non-tty) are emitted on ``update``/``tick`` when
    ``every_s`` passed since the last one, and at ``close`` when the loop ran at least ``every_s / 3``.
    ``clock``/``emit`` are injectable (tests);
    with the real clock a daemon thread calls ``tick`` so a line comes even when no unit finishes for a while."""

    def __init__(self, total: int, unit: str = "units", *, desc: str | None = None, asset: str | None = None,
                 partition: str | None = None, initial: int = 0, every_s: float | None = None, tty: bool | None = None,
                 clock: Callable[[], float] | None = None, emit: Callable[[str], None] | None = None,
                 heartbeat: bool | None = None):
        s_asset, s_part = current_scope()
        self.asset = asset or s_asset or desc or "work"
        self.desc = desc if (desc and not self.asset.endswith(desc)) else None
        self.partition = partition if partition is not None else s_part
        self.total, self.done, self.unit, self.every_s = int(total), int(initial), unit, float(every_s or EVERY_S)
        self._initial = int(initial)
        self.clock = clock or time.monotonic
        self.emit = emit or stderr_line
        self.t0 = self.last = self.clock()
        self.closed = False
        self._idle_lines = 0
        self._lock = threading.Lock()
        self._bar = None
        self._thread = None
        if tty if tty is not None else _is_tty():
            from tqdm.auto import tqdm

            label = self.asset + (f"[{self.partition}]" if self.partition else "") + (f" {self.desc}" if self.desc else "")
            self._bar = tqdm(total=self.total, initial=self.done, desc=label, unit=unit, leave=False)
        elif heartbeat if heartbeat is not None else clock is None:
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._beat, name="progress-heartbeat", daemon=True)
            self._thread.start()

    # -- reporting
    def line(self) -> str:
        elapsed = self.clock() - self.t0
        pct = f" ({100 * self.done / self.total:.0f}%)" if self.total else ""
        where = self.asset + (f" [{self.partition}]" if self.partition else "") + (f" {self.desc}" if self.desc else "")
        rate_eta = eta(self.done - self._initial, self.total - self._initial, elapsed)
        return (f"[progress] {where}: {self.done}/{self.total} {self.unit}{pct}, {fmt_secs(elapsed)} elapsed, "
                f"ETA {'0s' if self.done >= self.total else fmt_secs(rate_eta)}")

    def _emit_now(self) -> None:
        self.last = self.clock()
        _last_line[0] = time.monotonic()
        self.emit(self.line())

    def update(self, n: int = 1) -> None:
        with self._lock:
            self.done = min(self.total, self.done + int(n)) if self.total else self.done + int(n)
            self._idle_lines = 0
            if self._bar is not None:
                self._bar.update(n)
            elif self.clock() - self.last >= self.every_s:
                self._emit_now()

    MAX_IDLE_LINES = 4  # a loop left without close() (an exception) must not keep talking; the run's heartbeat will

    def tick(self) -> None:
        """Emit a line if ``every_s`` passed since the last one (called by the heartbeat thread); after
        ``MAX_IDLE_LINES`` lines without any ``update`` it stays quiet until the next one."""
        with self._lock:
            if self.closed or self._bar is not None or self.clock() - self.last < self.every_s:
                return
            if self._idle_lines >= self.MAX_IDLE_LINES:
                return
            self._idle_lines += 1
            self._emit_now()

    def _beat(self) -> None:
        while not self._stop.wait(_wake_s(self.every_s)):
            self.tick()

    def close(self) -> None:
        with self._lock:
            if self.closed:
                return
            self.closed = True
            if self._bar is not None:
                self._bar.close()
            elif self.total and (self.last > self.t0 or self.clock() - self.t0 >= self.every_s / 3):
                self._emit_now()  # the end of a loop that was long enough to be reported on
        if self._thread is not None:
            self._stop.set()

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def progress_bar(total: int, unit: str = "units", desc: str | None = None, **kw) -> Progress:
    """The reporter the long loops use; asset/partition come from the registered scope."""
    return Progress(total, unit, desc=desc, **kw)


class Heartbeat:
    """Calls ``line_fn()`` and emits its line every ``every_s`` seconds in which no progress line was emitted
    (e.g. `augment run` between partitions or during a step without a loop). ``stop()`` ends it."""

    def __init__(self, line_fn: Callable[[], str | None], every_s: float | None = None, emit: Callable[[str], None] | None = None,
                 start: bool = True, clock: Callable[[], float] | None = None):
        self.line_fn, self.every_s, self.emit = line_fn, float(every_s or EVERY_S), emit or stderr_line
        self.clock = clock or time.monotonic
        self.last = self.clock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="run-heartbeat", daemon=True) if start else None
        if self._thread is not None:
            self._thread.start()

    def tick(self) -> None:
        now = self.clock()
        real = self.clock is time.monotonic
        last = max(self.last, _last_line[0]) if real else self.last
        if now - last < self.every_s:
            return
        try:
            line = self.line_fn()
        except Exception as e:  # noqa: BLE001 - a heartbeat must not kill the run
            line = f"[progress] (status unavailable: {e})"
        if line:
            self.last = now
            if real:
                _last_line[0] = now
            self.emit(line)

    def _run(self) -> None:
        while not self._stop.wait(_wake_s(self.every_s)):
            self.tick()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2)

    def __enter__(self) -> "Heartbeat":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
