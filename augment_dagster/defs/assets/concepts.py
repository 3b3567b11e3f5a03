"""concept_embeddings: one textual-inversion token per class (DA-Fusion §1.2), per-class unit memo."""

import dagster as dg
import pandas as pd

from ..scaleout import gpu_op_tags
from ..resources import Models, StoreResource
from .common import Experiment, md_table, output, stage_asset


def build(exp: Experiment) -> list:
    cfg = exp.cfg

    @stage_asset(exp, "concept_embeddings", ins={"split": "few_shot_split"}, resources=("store", "models"),
        code_version=exp.code_version("concepts", ("models", "diffusion")), pool="gpu", op_tags=gpu_op_tags(True, exp.cfg),
        kinds={"pytorch", "diffusers"},
        description="Textual inversion: one new token per class learned on its K train images (frozen UNet/VAE/text encoder), "
                    "plus DIAGen noisy copies S*+σε (one fixed draw per σ).",
    )
    def concept_embeddings(context: dg.AssetExecutionContext, split: pd.DataFrame, store: StoreResource, models: Models) -> dg.Output:
        from ...stages.concepts import learn_concepts

        seed = exp.seed(context.partition_key)
        c = cfg.concepts
        rows, stats = learn_concepts(
            split, images=store.images(split, cfg.dataset), blobs=store.blobs, memo=store.memo(),
            model_fp=models.diffusion_fingerprint(), bundle_factory=models.diffusion, steps=c.steps, lr=c.lr,
            batch_size=c.batch_size, init_word=c.init_word, seed=seed,
            checkpoint_dir=store.path / "checkpoints" / "concepts", checkpoint_every=c.checkpoint_every, progress=True,
            weight_decay=c.weight_decay, latents=c.latents, init_fallback=c.init_fallback,
        )
        from ...methods.diagen import noise_variants

        for r in rows:
            r.update({"sigma": 0.0, "draw": -1, "base_embedding_id": r["embedding_id"], "noise_norm": 0.0})
        rows += noise_variants(rows, blobs=store.blobs, sigmas=c.noise_sigmas, seed=seed)
        df = pd.DataFrame(rows)
        df["created_by_run"] = context.run_id
        summary = df[df.variant == "base"][["label", "token", "first_loss", "last_loss", "moved", "reused"]]
        return output(df, {"computed": dg.MetadataValue.int(stats.computed), "reused": dg.MetadataValue.int(stats.reused),
                           "compute_seconds": dg.MetadataValue.float(round(stats.seconds, 3)),
                           "concepts": dg.MetadataValue.md(md_table(summary))})

    return [concept_embeddings]
