"""inversion_pool (Diff-II): DDIM inversion of every train image under the concept LoRA."""
import dagster as dg
import pandas as pd

from ..scaleout import gpu_op_tags
from ..resources import Models, StoreResource
from .common import Experiment, output, stage_asset


def build(exp: Experiment) -> list:
    cfg = exp.cfg

    @stage_asset(exp, "inversion_pool", ins={"split": "few_shot_split", "concept_lora": "concept_lora"},
        resources=("store", "models"),
        code_version=exp.code_version("inversion", ("models", "diffusion"), ("dataset", "metaclass")),
        kinds={"pytorch", "diffusers"}, pool="gpu", op_tags=gpu_op_tags(True, exp.cfg),
        description="DDIM inversion (DDIMInverseScheduler, guidance 1) of every train image with 'a photo of a <cls> <metaclass>' "
                    "on the concept+LoRA model; per-image memo; reconstruction error of invert → regenerate in metadata.",
    )
    def inversion_pool(context: dg.AssetExecutionContext, split: pd.DataFrame, concept_lora: pd.DataFrame,
                       store: StoreResource, models: Models) -> dg.Output:
        from ...stages.inversion import inversion_stage

        images = store.images(split, cfg.dataset)
        toks = concept_lora[concept_lora["kind"] == "token"]
        lora_blob = concept_lora[concept_lora["kind"] == "lora"]["blob"].iloc[0]
        prompts = {r.label: f"a photo of a {r.token} {cfg.dataset.metaclass}".strip() for r in toks.itertuples()}
        rows, stats = inversion_stage(
            split[split["role"] == "train"], images=images, blobs=store.blobs, memo=store.memo(),
            model_fp=models.diffusion_fingerprint(), core_factory=lambda: models.generation_core(lora_blob),
            prompts=prompts, concepts=dict(zip(toks["token"], toks["blob"])), load_tensor=images.tensor,
            steps=cfg.inversion.steps, lora_key=lora_blob, check_recon=cfg.inversion.check_reconstruction,
            recon_per_class=cfg.inversion.reconstruction_per_class)
        df = pd.DataFrame(rows)
        md = {"computed": dg.MetadataValue.int(stats.computed), "reused": dg.MetadataValue.int(stats.reused),
              "compute_seconds": dg.MetadataValue.float(round(stats.seconds, 3))}
        if stats.extra.get("mean_recon_rel_error") is not None:
            md["mean_recon_rel_error"] = dg.MetadataValue.float(stats.extra["mean_recon_rel_error"])
            md["recon_checked_images"] = dg.MetadataValue.int(int(stats.extra["recon_checked"]))
        return output(df, md)

    return [inversion_pool]
