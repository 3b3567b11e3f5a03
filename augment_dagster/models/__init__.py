"""Model building, loading and the shared generation core.

Submodules import torch / diffusers / transformers; this package file imports nothing, so importing
``augment_dagster.models`` stays free (Dagster's code server imports the package tree)."""
