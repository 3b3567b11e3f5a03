"""Content-addressed artifact store, unit memo cache, parquet manifests, DuckDB lineage views."""
from .blobs import BlobStore, BlobIntegrityError
from .memo import Memo, memo_key

__all__ = ["BlobStore", "BlobIntegrityError", "Memo", "memo_key"]
