"""captions: BLIP candidates (greedy, beam, nucleus) + CLIP similarity per train image (shared by SGID and Diff-II)."""
import dagster as dg
import pandas as pd

from ..config import parse_split_key
from ..scaleout import gpu_op_tags
from .common import (CONTENT_AUTOMATION, Experiment, captioner_bundle, clip_bundle, image_source, md_table, output,
                     release_models)
from .checks import asset_with_checks


def build(exp: Experiment) -> list:
    cfg = exp.cfg

    @asset_with_checks(exp,
        key=exp.key("captions"), group_name=exp.name, owners=["team:augment-dagster"], io_manager_key=exp.io_manager_key,
        partitions_def=exp.partitions, ins={"split": dg.AssetIn(key=exp.key("few_shot_split"))},
        code_version=exp.code_version(("models", "captioner"), ("models", "clip")), kinds={"pytorch", "transformers"},
        pool="gpu", automation_condition=CONTENT_AUTOMATION, op_tags=gpu_op_tags(True, exp.cfg),
        description="Captions of every train image: BLIP greedy, beam (3) and nucleus (top_p .9) candidates, 5-20 tokens, "
                    "each with its CLIP image-text similarity; per-image memo.",
    )
    def captions(context: dg.AssetExecutionContext, split: pd.DataFrame) -> dg.Output:
        from ..stages.captions import caption_images
        from ..models.loading import captioner_fingerprint, clip_fingerprint

        _, seed = parse_split_key(context.partition_key)
        m = cfg.models
        train = split[split["role"] == "train"]
        try:  # the models are loaded only when a caption is not in the memo yet
            rows, stats = caption_images(train, images=image_source(exp, split), memo=exp.memo(),
                                         captioner_fp=captioner_fingerprint(m.captioner.source, exp.data_dir,
                                                                            m.captioner.revision),
                                         clip_fp=clip_fingerprint(m.clip.source, exp.data_dir, m.clip.revision),
                                         captioner_factory=lambda: captioner_bundle(exp),
                                         clip_factory=lambda: clip_bundle(exp), seed=cfg.seed * 1000 + seed)
        finally:
            release_models("blip")  # only this stage uses the captioner: one model less in memory from here on
        df = pd.DataFrame(rows)
        best = df.sort_values("clip_score", ascending=False).groupby("image_id").head(1)
        return output(df, {"computed": dg.MetadataValue.int(stats.computed), "reused": dg.MetadataValue.int(stats.reused),
                           "mean_best_clip_score": dg.MetadataValue.float(float(best["clip_score"].mean()) if len(best) else 0.0),
                           "examples": dg.MetadataValue.md(md_table(best.head(6)[["label", "strategy", "caption", "clip_score"]]))})

    return [captions]
