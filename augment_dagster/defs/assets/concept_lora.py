"""concept_lora (Diff-II): one token per class + one LoRA shared by all classes, trained jointly."""
import dagster as dg
import pandas as pd

from ..scaleout import gpu_op_tags
from ..resources import Models, StoreResource
from .common import Experiment, output, stage_asset


def build(exp: Experiment) -> list:
    cfg = exp.cfg

    @stage_asset(exp, "concept_lora", ins={"split": "few_shot_split"}, resources=("store", "models"),
        code_version=exp.code_version("concept_lora", ("models", "diffusion"), ("dataset", "metaclass")),
        kinds={"pytorch", "diffusers"}, pool="gpu", op_tags=gpu_op_tags(True, exp.cfg),
        description="Diff-II concepts: one token per class + one LoRA shared by all classes (peft, UNet attention "
                    "projections), trained jointly on all train images; memo key covers every class's images.",
    )
    def concept_lora(context: dg.AssetExecutionContext, split: pd.DataFrame, store: StoreResource, models: Models) -> dg.Output:
        from ...stages.concept_lora import concept_lora_stage

        c = cfg.concept_lora
        rows, stats = concept_lora_stage(
            split[split["role"] == "train"], images=store.images(split, cfg.dataset), blobs=store.blobs,
            memo=store.memo(), model_fp=models.diffusion_fingerprint(), bundle_factory=models.diffusion,
            metaclass=cfg.dataset.metaclass, init_word=c.init_word, steps=c.steps, lr=c.lr, rank=c.rank,
            batch_size=c.batch_size, seed=exp.seed(context.partition_key),
            checkpoint_dir=store.path / "checkpoints" / "concept_lora", progress=True)
        df = pd.DataFrame(rows)
        df["created_by_run"] = context.run_id
        return output(df, {"computed": dg.MetadataValue.int(stats.computed), "reused": dg.MetadataValue.int(stats.reused),
                           "compute_seconds": dg.MetadataValue.float(round(stats.seconds, 3)),
                           **{k: dg.MetadataValue.float(float(v)) for k, v in stats.extra.items()}})

    return [concept_lora]
