"""Content-addressed blob store: ``<root>/blobs/ab/abcdef….<ext>``.

* The name of a blob is the sha256 of its bytes, so a blob is immutable and verifiable.
* Writes are atomic (temp file in the same folder, fsync, rename). A killed writer leaves at most a
  ``.tmp-*`` file that no reader looks at; ``sweep_temp`` removes stale ones.
* Writing a blob that exists is a no-op (two processes writing the same content race harmlessly).
* A failed write (disk full, permission) raises ``BlobWriteError`` naming the path; no partial blob remains.
"""
from __future__ import annotations

import os
import time
from pathlib import Path

from ..util import atomic_write_bytes, sha256_bytes, sha256_file


class BlobIntegrityError(RuntimeError):
    pass


class BlobWriteError(OSError):
    pass


class BlobStore:
    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self.blob_dir = self.root / "blobs"

    def path(self, digest: str, ext: str = "") -> Path:
        if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
            raise ValueError(f"not a sha256 digest: {digest!r}")
        ext = ext.lstrip(".")
        name = f"{digest}.{ext}" if ext else digest
        return self.blob_dir / digest[:2] / name

    def put(self, data: bytes, ext: str = "") -> str:
        digest = sha256_bytes(data)
        p = self.path(digest, ext)
        if p.exists() and p.stat().st_size == len(data):
            return digest
        try:
            atomic_write_bytes(p, data)
        except OSError as e:
            raise BlobWriteError(e.errno, f"could not write blob {p}: {e.strerror or e}") from e
        return digest

    def put_file(self, src: str | os.PathLike, ext: str = "") -> str:
        return self.put(Path(src).read_bytes(), ext or Path(src).suffix)

    def find(self, digest: str) -> Path:
        """Path of a blob by digest whatever its extension."""
        d = self.blob_dir / digest[:2]
        for cand in (d / digest, *sorted(d.glob(f"{digest}.*"))):
            if cand.exists():
                return cand
        raise FileNotFoundError(f"blob {digest} not in store {self.blob_dir}")

    def exists(self, digest: str) -> bool:
        try:
            self.find(digest)
            return True
        except FileNotFoundError:
            return False

    def get(self, digest: str, verify: bool = False) -> bytes:
        data = self.find(digest).read_bytes()
        if verify and sha256_bytes(data) != digest:
            raise BlobIntegrityError(f"blob {digest} is corrupt (content hash differs)")
        return data

    def verify_all(self) -> list[Path]:
        """Return blobs whose content hash differs from their name (should always be empty)."""
        bad = []
        for p in self.blob_dir.glob("*/*"):
            if p.name.startswith(".tmp-"):
                continue
            if sha256_file(p) != p.name.split(".")[0]:
                bad.append(p)
        return bad

    def sweep_temp(self, older_than_s: float = 3600) -> int:
        """Remove temp files left by killed writers (older than ``older_than_s``)."""
        n = 0
        now = time.time()
        for p in self.root.rglob(".tmp-*"):
            try:
                if now - p.stat().st_mtime > older_than_s:
                    p.unlink()
                    n += 1
            except FileNotFoundError:
                pass
        return n
