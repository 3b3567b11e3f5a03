"""concept_embeddings: one textual-inversion token per class (DA-Fusion §1.2), per-class unit memo."""

import dagster as dg
import pandas as pd

from ..config import parse_split_key
from ..scaleout import gpu_op_tags
from .common import CONTENT_AUTOMATION, Experiment, diffusion_bundle, diffusion_fingerprint, image_source, md_table, output
from .checks import asset_with_checks


def build(exp: Experiment) -> list:
    cfg = exp.cfg

    @asset_with_checks(exp,
        key=exp.key("concept_embeddings"), group_name=exp.name, owners=["team:augment-dagster"], io_manager_key=exp.io_manager_key,
        partitions_def=exp.partitions, ins={"split": dg.AssetIn(key=exp.key("few_shot_split"))},
        code_version=exp.code_version("concepts", ("models", "diffusion")), pool="gpu", op_tags=gpu_op_tags(True, exp.cfg),
        kinds={"pytorch", "diffusers"}, automation_condition=CONTENT_AUTOMATION,
        description="Textual inversion: one new token per class learned on its K train images (frozen UNet/VAE/text encoder), "
                    "plus DIAGen noisy copies S*+σε (one fixed draw per σ).",
    )
    def concept_embeddings(context: dg.AssetExecutionContext, split: pd.DataFrame) -> dg.Output:
        from ..stages.concepts import learn_concepts

        _, seed = parse_split_key(context.partition_key)
        c = cfg.concepts
        rows, stats = learn_concepts(
            split, images=image_source(exp, split), blobs=exp.blobs, memo=exp.memo(),
            model_fp=diffusion_fingerprint(exp), bundle_factory=lambda: diffusion_bundle(exp), steps=c.steps, lr=c.lr,
            batch_size=c.batch_size, init_word=c.init_word, seed=cfg.seed * 1000 + seed,
            checkpoint_dir=exp.data_dir / "checkpoints" / "concepts", checkpoint_every=c.checkpoint_every, progress=True,
            weight_decay=c.weight_decay, latents=c.latents, init_fallback=c.init_fallback,
        )
        from ..methods.diagen import noise_variants

        for r in rows:
            r.update({"sigma": 0.0, "draw": -1, "base_embedding_id": r["embedding_id"], "noise_norm": 0.0})
        rows += noise_variants(rows, blobs=exp.blobs, sigmas=c.noise_sigmas, seed=cfg.seed * 1000 + seed)
        df = pd.DataFrame(rows)
        df["created_by_run"] = context.run_id
        summary = df[df.variant == "base"][["label", "token", "first_loss", "last_loss", "moved", "reused"]]
        return output(df, {"computed": dg.MetadataValue.int(stats.computed), "reused": dg.MetadataValue.int(stats.reused),
                           "compute_seconds": dg.MetadataValue.float(round(stats.seconds, 3)),
                           "concepts": dg.MetadataValue.md(md_table(summary))})

    return [concept_embeddings]
