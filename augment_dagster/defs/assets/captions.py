"""captions: BLIP candidates (greedy, beam, nucleus) + CLIP similarity per train image (shared by SGID and Diff-II)."""
import dagster as dg
import pandas as pd

from ..scaleout import gpu_op_tags
from ..resources import Models, StoreResource
from .common import Experiment, md_table, output, stage_asset


def build(exp: Experiment) -> list:
    cfg = exp.cfg

    @stage_asset(exp, "captions", ins={"split": "few_shot_split"}, resources=("store", "models"),
        code_version=exp.code_version(("models", "captioner"), ("models", "clip")), kinds={"pytorch", "transformers"},
        pool="gpu", op_tags=gpu_op_tags(True, exp.cfg),
        description="Captions of every train image: BLIP greedy, beam (3) and nucleus (top_p .9) candidates, 5-20 tokens, "
                    "each with its CLIP image-text similarity; per-image memo.",
    )
    def captions(context: dg.AssetExecutionContext, split: pd.DataFrame, store: StoreResource, models: Models) -> dg.Output:
        from ...stages.captions import caption_images

        train = split[split["role"] == "train"]
        with models.captioner() as captioner:  # the models are loaded only when a caption is not in the memo yet
            rows, stats = caption_images(train, images=store.images(split, cfg.dataset), memo=store.memo(),
                                         captioner_fp=models.captioner_fingerprint(), clip_fp=models.clip_fingerprint(),
                                         captioner_factory=captioner, clip_factory=models.clip,
                                         seed=exp.seed(context.partition_key))
        df = pd.DataFrame(rows)
        best = df.sort_values("clip_score", ascending=False).groupby("image_id").head(1)
        return output(df, {"computed": dg.MetadataValue.int(stats.computed), "reused": dg.MetadataValue.int(stats.reused),
                           "mean_best_clip_score": dg.MetadataValue.float(float(best["clip_score"].mean()) if len(best) else 0.0),
                           "examples": dg.MetadataValue.md(md_table(best.head(6)[["label", "strategy", "caption", "clip_score"]]))})

    return [captions]
