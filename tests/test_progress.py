"""Progress reporting outside a terminal: a line at least every 30 s with asset, partition, done/total and ETA."""
import re

from augment_dagster import progress as P


class FakeClock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t


LINE = re.compile(r"^\[progress\] (?P<asset>\S+) \[(?P<part>[^\]]+)\]: (?P<done>\d+)/(?P<total>\d+) img \(\d+%\), "
                  r"(?P<elapsed>\S+) elapsed, ETA (?P<eta>\S+)$")


def test_a_line_at_least_every_30s_with_asset_partition_done_total_eta(monkeypatch):
    clock, lines = FakeClock(), []
    monkeypatch.setattr(P, "_scope_provider", lambda: ("demo/synthetic/dafusion", "2shot-s0"))
    bar = P.progress_bar(10, "img", tty=False, clock=clock, emit=lines.append)
    emitted_at = [clock.t]
    for step in range(10):
        for _ in range(4):  # 40 s per unit: the heartbeat (tick) must speak while no unit finishes
            clock.t += 10
            n = len(lines)
            bar.tick()
            if len(lines) > n:
                emitted_at.append(clock.t)
        bar.update(1)
    bar.close()
    assert max(b - a for a, b in zip(emitted_at, emitted_at[1:])) <= 30
    parsed = [LINE.match(x) for x in lines]
    assert all(parsed), lines
    assert {m["asset"] for m in parsed} == {"demo/synthetic/dafusion"} and {m["part"] for m in parsed} == {"2shot-s0"}
    assert {m["total"] for m in parsed} == {"10"}
    assert parsed[-1]["done"] == "10" and parsed[-1]["eta"] == "0s"
    mid = next(m for m in parsed if m["done"] == "5")  # half done: the ETA is the time spent so far
    assert mid["eta"] == mid["elapsed"] and mid["eta"].startswith("3m")


def test_eta_and_formatting():
    assert P.eta(0, 10, 5.0) is None and P.eta(5, 10, 50.0) == 50.0
    assert P.fmt_secs(None) == "?" and P.fmt_secs(59) == "59s" and P.fmt_secs(125) == "2m05s" and P.fmt_secs(7300) == "2h01m"


def test_short_loops_stay_quiet_and_updates_throttle():
    clock, lines = FakeClock(), []
    bar = P.Progress(100, "steps", asset="x", tty=False, clock=clock, emit=lines.append)
    for _ in range(100):
        clock.t += 0.01
        bar.update()
    bar.close()
    assert lines == []  # a 1 s loop prints nothing (the run's heartbeat covers such stretches)
    bar = P.Progress(100, "steps", asset="x", tty=False, clock=clock, emit=lines.append)
    for _ in range(100):
        clock.t += 1.0
        bar.update()
    bar.close()
    assert 3 <= len(lines) <= 5 and lines[-1].startswith("[progress] x: 100/100 steps (100%)")


def test_terminal_uses_a_bar_and_no_lines(monkeypatch):
    lines = []
    bar = P.Progress(5, "img", asset="a", tty=True, emit=lines.append)
    assert bar._bar is not None
    for _ in range(5):
        bar.update()
    bar.close()
    assert lines == [] and bar._bar.n == 5


def test_heartbeat_speaks_only_when_nothing_else_did():
    clock, lines = FakeClock(), []
    hb = P.Heartbeat(lambda: "[progress] augment run: partition p (1/2)", emit=lines.append, start=False, clock=clock)
    clock.t += 29
    hb.tick()
    assert lines == []
    clock.t += 1
    hb.tick()
    hb.tick()
    assert lines == ["[progress] augment run: partition p (1/2)"]


def test_an_abandoned_loop_goes_quiet():
    clock, lines = FakeClock(), []
    bar = P.Progress(10, "steps", asset="x", tty=False, clock=clock, emit=lines.append)
    bar.update()
    for _ in range(20):  # never closed (its loop raised): at most MAX_IDLE_LINES more lines
        clock.t += 30
        bar.tick()
    assert len(lines) == P.Progress.MAX_IDLE_LINES
    bar.update()  # progress again: it speaks again
    clock.t += 30
    bar.tick()
    assert len(lines) > P.Progress.MAX_IDLE_LINES and lines[-1].startswith("[progress] x: 2/10 steps")


def test_heartbeat_threads_wake_at_most_once_a_second():
    """AUGMENT_PROGRESS_EVERY_S=0 (a line on every update) must not make the heartbeat threads spin."""
    assert P._wake_s(0.0) == 1.0 and P._wake_s(2.0) == 2.0 and P._wake_s(30.0) == 5.0
