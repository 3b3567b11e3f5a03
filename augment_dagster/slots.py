"""Device slots: which device a worker computes on, and one worker per device at a time.

``execution.devices`` names the slots: ``auto`` is every visible CUDA device (``cuda:0``, ``cuda:1``, ...), or on a
CPU-only machine one ``cpu`` slot per ``execution.cpu_threads`` cores; a list (``[cuda:0, cuda:2]``) names them.
``$AUGMENT_DEVICES`` (``augment run --devices``) overrides the config: ``auto``, a count (``1`` = the first slot of
``execution.devices`` only) or a comma list (``cuda:0,cuda:2``).

Dagster schedules the work (the ``gpu`` pool's limit is the number of slots, runs and steps are Dagster's); what
Dagster lacks is *which* device a step gets. A process takes a **slot lease** — an exclusive ``flock`` on
``<data dir>/slots/<host>/<i>.lock`` — before it computes: a worker of ``augment run`` at its start, a step of
Dagster's multiprocess executor (or ``dagster dev``) the first time it asks for its device. The lease pins the
process to the slot's device (``torch.cuda.set_device``) and fixes its torch thread count, so no two steps share a
device and results do not depend on how many slots there are. The kernel drops the lock when the process ends, so
a killed worker never keeps its slot. The slot is recorded in each step's metadata (``slot``, ``slot_device``) and
in each unit's memo record (``_computed_on``), never in a key.

No torch and no Dagster at import time.
"""
from __future__ import annotations

import fcntl
import os
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path

ENV = "AUGMENT_DEVICES"


@dataclass(frozen=True)
class Slot:
    index: int
    device: str
    threads: int

    def label(self) -> str:
        return f"slot {self.index} ({self.device})"


def cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - macOS
        return os.cpu_count() or 1


def _cuda_devices(cfg) -> list[str]:
    if cfg.models.device not in ("auto",) and not str(cfg.models.device).startswith("cuda"):
        return []  # models.device: cpu / mps on a GPU box keeps the work there
    try:
        import torch
    except ImportError:  # pragma: no cover
        return []
    return [f"cuda:{i}" for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []


def resolve(cfg) -> list[Slot]:
    """The slots of ``cfg`` (an ExperimentConfig), ``$AUGMENT_DEVICES`` taken into account."""
    ex = cfg.execution
    spec = os.environ.get(ENV, "").strip() or ex.devices
    threads = ex.cpu_threads
    count = None
    if isinstance(spec, str) and spec.isdigit():
        count, spec = max(1, int(spec)), ex.devices  # the first N slots of the config's own
    if isinstance(spec, str) and spec != "auto":
        spec = [d.strip() for d in spec.split(",") if d.strip()]
    if spec == "auto":
        devs = _cuda_devices(cfg)
        if not devs:
            dev = cfg.models.device if cfg.models.device not in ("auto",) else "cpu"
            devs = [dev] * max(1, cpu_count() // threads)
    else:
        devs = list(spec)
    if count is not None:
        devs = devs[:count]
    return [Slot(i, d, threads) for i, d in enumerate(devs)]


# ---------------------------------------------------------------- the lease of this process
_LOCK = threading.Lock()
_held: dict = {}  # {"slot": Slot, "fh": file}


def lock_dir(data_dir: str | os.PathLike) -> Path:
    d = Path(data_dir) / "slots" / socket.gethostname()
    d.mkdir(parents=True, exist_ok=True)
    return d


def current() -> Slot | None:
    """The slot this process holds, if any."""
    return _held.get("slot")


# the thread count of BLAS/OpenMP runtimes that load after the pin (scipy's own OpenBLAS loads only when a
# scikit-learn solver first runs): they read it from the environment when they load
THREAD_ENV = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


def _pin(slot: Slot) -> None:
    import torch

    if torch.get_num_threads() != slot.threads:
        torch.set_num_threads(slot.threads)
    # every BLAS and OpenMP runtime too: N workers x all cores each oversubscribe the CPU (an unpinned OpenBLAS
    # thread server spins beside the step: scipy's made the demo's metrics steps 2x slower on two slots), and a
    # fixed count keeps results independent of the slots. Loaded runtimes through threadpoolctl, later ones
    # through the environment.
    for var in THREAD_ENV:
        os.environ[var] = str(slot.threads)
    from threadpoolctl import threadpool_limits

    threadpool_limits(limits=slot.threads)
    if slot.device.startswith("cuda") and torch.cuda.is_available():
        torch.cuda.set_device(torch.device(slot.device))


def lease(cfg, prefer: int | None = None, poll_s: float = 0.2) -> Slot:
    """Take a free slot of ``cfg`` (waiting until one is free) and pin this process to it; the slot already held
    is returned as is. ``prefer``: try this slot index first."""
    with _LOCK:
        if "slot" in _held:
            return _held["slot"]
        slots = resolve(cfg)
        d = lock_dir(cfg.resolved_data_dir())
        order = sorted(slots, key=lambda s: (s.index != prefer, s.index))
        waited = False
        while True:
            for s in order:
                fh = open(d / f"{s.index}.lock", "a+")
                try:
                    fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except OSError:
                    fh.close()
                    continue
                fh.seek(0)
                fh.truncate()
                fh.write(f"{os.getpid()} {s.device}\n")
                fh.flush()
                _held.update(slot=s, fh=fh)
                _pin(s)
                return s
            if not waited:  # say once why nothing happens (another run or worker holds every slot)
                import sys

                holders = "; ".join(f"{p.stem}: {p.read_text().strip() or '?'}" for p in sorted(d.glob("*.lock")))
                print(f"[slots] every device slot is leased ({holders}); waiting for one", file=sys.stderr, flush=True)
                waited = True
            time.sleep(poll_s)


def release() -> None:
    """Give the slot back (also happens when the process ends)."""
    with _LOCK:
        fh = _held.pop("fh", None)
        _held.pop("slot", None)
        if fh is not None:
            try:
                fcntl.flock(fh, fcntl.LOCK_UN)
            finally:
                fh.close()


def device_for(cfg) -> str:
    """The device a step of ``cfg`` computes on: its slot's (taking a lease if this process holds none)."""
    return lease(cfg).device


def computed_on() -> dict | None:
    """``{"slot": i, "device": d, "host": h}`` of this process's slot, for memo records and step metadata."""
    s = current()
    return None if s is None else {"slot": s.index, "device": s.device, "host": socket.gethostname()}
