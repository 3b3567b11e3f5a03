"""Built-in generated dataset, imagefolder loader, stable few-shot split sampler (no torch, no Dagster)."""
