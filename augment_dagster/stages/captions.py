"""Captions of every train image (Diff-II §3.4, SGID §5.2): BLIP greedy, beam (3) and nucleus (top_p 0.9)
candidates of 5–20 tokens, each with its CLIP image–text similarity. Per-image unit memo. No Dagster."""
from __future__ import annotations

import time
from typing import Any, Callable

import pandas as pd

from ..llm import sanitize_prompt
from ..store import BlobStore, Memo, memo_key
from ..data.images import ImageSource
from . import StageStats

CAPTIONS_VERSION = "cap-1"


def caption_images(train: pd.DataFrame, *, images: ImageSource, memo: Memo, captioner_fp: str, clip_fp: str,
                   captioner_factory: Callable[[], Any], clip_factory: Callable[[], Any], seed: int,
                   n_nucleus: int = 10) -> tuple[list[dict], StageStats]:
    from ..models.clip_ops import caption_candidates, pair_similarity

    t0 = time.perf_counter()
    stats = StageStats()
    rows = []
    for r in train.itertuples():
        key = memo_key("captions", CAPTIONS_VERSION, model=f"{captioner_fp}|{clip_fp}", params={"n_nucleus": n_nucleus},
                       inputs=r.image_id, seed=seed)
        rec = memo.get(key)
        if rec is None:
            im = images.real(r.image_id)
            cands = caption_candidates(captioner_factory(), im, seed=seed, n_nucleus=n_nucleus)
            cands = [(s, sanitize_prompt(c)) for s, c in cands]
            sims = pair_similarity(clip_factory(), [im] * len(cands), [c for _, c in cands])
            rec = {"candidates": [{"strategy": s, "caption": c, "clip_score": float(x)} for (s, c), x in zip(cands, sims)]}
            rec = memo.put(key, rec)
            stats.computed += 1
        else:
            stats.reused += 1
        for i, c in enumerate(rec["candidates"]):
            rows.append({"image_id": r.image_id, "label": r.label, "idx": i, **c, "captioner_fingerprint": captioner_fp,
                         "clip_fingerprint": clip_fp, "memo_key": key})
    stats.seconds = time.perf_counter() - t0
    return rows, stats
