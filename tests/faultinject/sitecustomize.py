"""Fault injection for tests/test_faults.py (put this folder on PYTHONPATH of a subprocess).

``AUGMENT_TEST_FAULT=<KIND>:<path part>`` makes every ``os.replace`` (the last step of each atomic write in the
project) whose destination contains ``<path part>`` fail as the machine would: ``EACCES`` / ``ENOSPC`` / ``EROFS``
raise that ``OSError``, ``MemoryError`` raises ``MemoryError``. Used where the real fault cannot be produced
(tests run as root, so permissions do not stop writes; an allocator failure cannot be forced cheaply).
"""
import errno
import os

_spec = os.environ.get("AUGMENT_TEST_FAULT")
if _spec:
    _kind, _, _part = _spec.partition(":")
    _replace = os.replace

    def _faulty_replace(src, dst, *a, **kw):
        if _part in os.fspath(dst):
            if _kind == "MemoryError":
                raise MemoryError()
            code = getattr(errno, _kind)
            raise OSError(code, os.strerror(code), os.fspath(dst))
        return _replace(src, dst, *a, **kw)

    os.replace = _faulty_replace
