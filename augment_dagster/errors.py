"""User errors: bad input a person can fix (a config key, a dataset file, a model source, an LLM endpoint).

Every such error derives from :class:`UserError`. The ``augment`` CLI prints it as one short block — what went
wrong, where (file / key / URL, named in the message), what to do — and exits 2; ``-v`` shows the trace.
Errors raised inside a Dagster step reach the CLI either as the original exception (in-process runs) or as text
inside Dagster's failure (out-of-process steps, asset-check failures); :func:`find_user_error` unwraps both.
No torch, no Dagster at import time.
"""
from __future__ import annotations

import re

# class name -> default advice, used when an error arrives only as text (e.g. from an out-of-process step)
HINTS = {
    "ConfigError": "fix the named key in the config file (see assets_config/demo.yaml for a valid example)",
    "DatasetError": "fix the dataset folder (dataset.source), or switch to dataset.source: builtin",
    "BadImageError": "fix or remove the file, or set dataset.on_bad_file: skip to skip unreadable files",
    "SplitError": "add images, lower splits.shots / splits.val_per_class, or set splits.fewer_than_k: use_all",
    "LLMError": "check that the LLM server is reachable and the model exists (models.llm.base_url / models.llm.model), "
                "or set models.llm.fallback_to_offline: true",
    "MissingAPIKeyError": "export the API key variable named above, or set models.llm.provider: offline",
    "NotEnoughPromptsError": "check the LLM's answers (models.llm), or set models.llm.provider: offline",
    "ModelSourceError": "point the named models.* source at a local folder or a reachable hub id (or use source: tiny)",
    "AssetCheckFailed": "inspect the asset's Checks tab in `dagster dev`, or its manifest; fix the input and rerun",
    "ConfigFileError": "check the --config path (a YAML file, e.g. assets_config/demo.yaml)",
    "DataDirError": "point --data-dir (or $AUGMENT_DATA_DIR) at a folder you can write to",
    "DiskFullError": "free space on that disk (or point --data-dir at a larger one), then rerun `augment run`: "
                     "finished units are reused",
    "ReadOnlyStorageError": "make the folder writable (or point --data-dir / DAGSTER_HOME at a writable folder), "
                            "then rerun `augment run`",
    "PermissionDeniedError": "fix the folder's owner/permissions (or point --data-dir at a folder you own), "
                             "then rerun `augment run`",
    "OutOfMemoryError": "lower generation.batch_size / training.batch_size (or use a smaller model), then rerun "
                        "`augment run`: finished units are reused",
    "UnknownNameError": "use one of the names listed above",
}


class UserError(Exception):
    """Base of errors caused by input a user can fix. ``hint`` is the "what to do" line (class default)."""

    hint: str = ""

    def __init__(self, *args, hint: str | None = None):
        super().__init__(*args)
        if hint:
            self.hint = hint

    def advice(self) -> str:
        return self.hint or HINTS.get(type(self).__name__, "") or next(
            (HINTS[c.__name__] for c in type(self).__mro__ if c.__name__ in HINTS), "")


_NAMES = "|".join(sorted(HINTS, key=len, reverse=True))
_TEXT_RE = re.compile(rf"\b(?:[\w.]+\.)?({_NAMES}): (.+)")


class _TextUserError(UserError):
    """A user error known only from its class name and message (Dagster failure text)."""

    def __init__(self, cls_name: str, message: str):
        super().__init__(message)
        self.cls_name = cls_name
        self.hint = HINTS.get(cls_name, "")


class ConfigFileError(UserError):
    """The --config path is missing, a folder or not readable text."""


class DataDirError(UserError):
    """The data dir (or DAGSTER_HOME) is not a usable folder."""


class UnknownNameError(UserError):
    """A method, partition or other name given on the command line does not exist in the config."""


class SystemFaultError(UserError):
    """A fault of the machine a user can fix (disk full, read-only storage, permissions, memory), found in the
    cause chain of a failure (also inside a Dagster step or Dagster's own storage)."""


class DiskFullError(SystemFaultError):
    pass


class ReadOnlyStorageError(SystemFaultError):
    pass


class PermissionDeniedError(SystemFaultError):
    pass


class OutOfMemoryError(SystemFaultError):
    pass


# errno -> (class, what happened)
_ERRNO = {28: (DiskFullError, "no space left on the device"), 122: (DiskFullError, "disk quota exceeded"),
          30: (ReadOnlyStorageError, "the storage is read-only"), 13: (PermissionDeniedError, "permission denied"),
          1: (PermissionDeniedError, "operation not permitted"), 12: (OutOfMemoryError, "out of memory")}
# text of errors that arrive without an errno (sqlite through SQLAlchemy, torch allocators, Dagster failure text)
_FAULT_TEXT = [
    (re.compile(r"\[Errno 28\]|No space left on device|database or disk is full|\bSQLITE_FULL\b", re.I),
     DiskFullError, "no space left on the device"),
    (re.compile(r"disk I/O error", re.I), DiskFullError,
     "the Dagster database could not write (sqlite: disk I/O error — usually a full disk)"),
    (re.compile(r"\[Errno 30\]|Read-only file system|attempt to write a readonly database", re.I), ReadOnlyStorageError,
     "the storage is read-only"),
    (re.compile(r"\[Errno 13\]|Permission denied", re.I), PermissionDeniedError, "permission denied"),
    (re.compile(r"\bMemoryError\b|\bOutOfMemoryError\b|CUDA out of memory|can't allocate memory|"
                r"Cannot allocate memory", re.I), OutOfMemoryError, "out of memory"),
    (re.compile(r"unable to open database file", re.I), ReadOnlyStorageError,
     "the Dagster database cannot be opened (folder missing, read-only or not permitted)"),
]


def _where() -> str:
    import os

    parts = []
    if os.environ.get("AUGMENT_DATA_DIR"):
        parts.append(f"data dir {os.environ['AUGMENT_DATA_DIR']}")
    if os.environ.get("DAGSTER_HOME"):
        parts.append(f"DAGSTER_HOME {os.environ['DAGSTER_HOME']}")
    return ", ".join(parts) or "the data dir"


def system_fault(exc: BaseException) -> SystemFaultError | None:
    """Disk full / read-only / permission denied / out of memory behind ``exc`` (its cause/context chain or the
    text Dagster kept of a step failure), as a :class:`SystemFaultError` naming the file or folder; else None."""
    seen, e = set(), exc
    chain = []
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        chain.append(e)
        nxt = getattr(e, "user_exception", None)
        e = nxt if isinstance(nxt, BaseException) and id(nxt) not in seen else (e.__cause__ or e.__context__)
    for e in chain:
        if isinstance(e, MemoryError) or type(e).__name__ == "OutOfMemoryError":
            return OutOfMemoryError(f"out of memory ({type(e).__name__}: {str(e)[:120] or 'allocation failed'}) "
                                    f"in a step of the run")
        if isinstance(e, OSError) and e.errno in _ERRNO:
            cls, what = _ERRNO[e.errno]
            if e.filename:
                where = f"{e.filename}" + (f" (-> {e.filename2})" if e.filename2 else "")
            elif e.strerror and "/" in str(e.strerror):  # e.g. BlobWriteError: "could not write blob <path>: ..."
                where = str(e.strerror)
            else:
                where = _where()
            return cls(f"{what}: {where}")
    for e in chain:
        text = f"{type(e).__name__}: {e}"
        for rx, cls, what in _FAULT_TEXT:
            if rx.search(text):
                m = re.search(r"\[Errno \d+\] [^:'\n]*: '([^']+)'", text)
                return cls(f"{what}: {m.group(1) if m else _where()}")
    return None


def find_user_error(exc: BaseException) -> UserError | None:
    """The user error behind ``exc``: itself, one in its cause/context chain, or one named in the text of a
    Dagster failure (a step run out of process, a blocking asset check)."""
    seen = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, UserError):
            return e
        user = getattr(e, "user_exception", None)
        if isinstance(user, UserError):
            return user
        e = e.__cause__ or e.__context__
    text = str(exc)
    m = _TEXT_RE.search(text)
    if m:
        return _TextUserError(m.group(1), m.group(2).strip())
    if type(exc).__name__ == "DagsterAssetCheckFailedError":  # "1 blocking asset check failed ...:\n<asset>: <check>"
        return _TextUserError("AssetCheckFailed", " ".join(text.split()) or "a blocking asset check failed")
    return system_fault(exc)


def format_user_error(err: UserError, max_width: int = 2400) -> str:
    """One short block (at most 5 lines): what and where (the message names the file/key/URL), what to do."""
    name = getattr(err, "cls_name", None) or type(err).__name__
    msg = " ".join(str(err).split())
    if len(msg) > max_width:
        msg = msg[: max_width - 1] + "…"
    lines = [f"augment: error ({name}): {msg}"]
    advice = err.advice()
    if advice:
        lines.append(f"  what to do: {advice}")
    lines.append("  (rerun with -v for the full trace)")
    return "\n".join(lines)


# a blocking check failed: the CLI names the asset and check; an interrupt: the CLI says what was kept
_QUIET = {"DagsterAssetCheckFailedError", "DagsterExecutionInterruptedError", "KeyboardInterrupt"}


def _error_info_names(info) -> list[str]:
    """Class names along a Dagster SerializableErrorInfo's cause/context chain."""
    names, seen = [], 0
    while info is not None and seen < 20:
        names.append(getattr(info, "cls_name", "") or "")
        info, seen = getattr(info, "cause", None) or getattr(info, "context", None), seen + 1
    return names


def _error_info_is_fault(info) -> bool:
    seen = 0
    while info is not None and seen < 20:
        text = f"{getattr(info, 'cls_name', '')}: {getattr(info, 'message', '')}"
        if any(rx.search(text) for rx, _, _ in _FAULT_TEXT):
            return True
        info, seen = getattr(info, "cause", None) or getattr(info, "context", None), seen + 1
    return False


def _is_user_info(info) -> bool:
    return (any(n in HINTS or n in _QUIET or n in _user_class_names() for n in _error_info_names(info))
            or _error_info_is_fault(info))


def is_user_error_log(record) -> bool:
    """A Dagster log record of a step/run failure caused by a user error (its trace is noise for the user:
    the CLI prints the short block instead)."""
    meta = getattr(record, "dagster_meta", None) or {}
    event = meta.get("dagster_event") if isinstance(meta, dict) else None
    if event is None:
        return False
    kind = getattr(event, "event_type_value", "")
    if kind == "STEP_FAILURE":
        info = getattr(getattr(event, "step_failure_data", None), "error", None)
        return _is_user_info(info)
    if kind in ("RUN_FAILURE", "PIPELINE_FAILURE"):  # the run-level echo of the step's error
        info = getattr(getattr(event, "event_specific_data", None), "error", None)
        return info is None or _is_user_info(info)
    return False


def _user_class_names() -> set[str]:
    def walk(c):
        for s in c.__subclasses__():
            yield s.__name__
            yield from walk(s)

    return set(walk(UserError))


def quiet_user_error_logs() -> None:
    """Make Dagster's console loggers created from now on drop failure records caused by user errors.

    Dagster builds its console logger with ``logging.getLoggerClass()``; the CLI (without ``-v``) installs this
    class so a bad image reads as the CLI's short block, not as a 40-line trace logged by the step."""
    import logging

    base = logging.getLoggerClass()
    if getattr(base, "_augment_quiet", False):
        return

    class QuietUserErrors(base):  # type: ignore[misc, valid-type]
        _augment_quiet = True

        def handle(self, record):
            if record.levelno >= logging.ERROR and is_user_error_log(record):
                return
            super().handle(record)

    logging.setLoggerClass(QuietUserErrors)


class _DropInterruptTraces:
    """A logging filter: drop records whose exception is an interrupt (Ctrl-C / SIGTERM landing while SQLAlchemy
    closes a pooled connection logs a trace; the CLI says what happened instead)."""

    def filter(self, record) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        return not (exc is not None and (isinstance(exc, KeyboardInterrupt)
                                         or type(exc).__name__ == "DagsterExecutionInterruptedError"))


def quiet_interrupt_traces() -> None:
    import logging

    names = ["sqlalchemy.pool"]
    try:
        from sqlalchemy.pool import impl

        names += [f"{c.__module__}.{c.__name__}" for c in vars(impl).values() if isinstance(c, type)
                  and c.__module__ == impl.__name__]
    except ImportError:  # pragma: no cover - SQLAlchemy comes with Dagster
        pass
    for name in names:
        logging.getLogger(name).addFilter(_DropInterruptTraces())
    if logging.lastResort is not None:
        logging.lastResort.addFilter(_DropInterruptTraces())

