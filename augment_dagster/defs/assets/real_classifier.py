"""real_classifier: the split's real-only classifier (the real_only baseline; GeNIe-Ada's noise search, filters)."""
import dagster as dg
import pandas as pd

from ..resources import StoreResource
from .common import Experiment, output, stage_asset
from .evaluation import REAL_ONLY, classifier_md, rec_df


def build(exp: Experiment) -> list:
    cfg = exp.cfg

    @stage_asset(exp, "real_classifier", ins={"split": "few_shot_split"}, resources=("store",),
        code_version=exp.code_version("training", ("models", "classifier")), kinds={"pytorch"},
        description="Classifier trained on the real train split only (the real_only baseline), best epoch on val, "
                    "with temperature T fitted on val (min NLL of softmax(z/T)).",
    )
    def real_classifier(context: dg.AssetExecutionContext, split: pd.DataFrame, store: StoreResource) -> dg.Output:
        from ...training.stage import train_classifier_stage

        rec, stats = train_classifier_stage(split, images=store.images(split, cfg.dataset), blobs=store.blobs,
                                            memo=store.memo(), training=cfg.training, classifier_cfg=cfg.models.classifier,
                                            seed=exp.seed(context.partition_key), device=exp.device, fit_temperature=True,
                                            name="real_classifier")
        md = classifier_md(rec)
        md.update({"computed": dg.MetadataValue.int(stats.computed), "reused": dg.MetadataValue.int(stats.reused),
                   "val_nll_before_T": dg.MetadataValue.float(float(rec["val_nll_before_T"] or float("nan"))),
                   "val_nll_after_T": dg.MetadataValue.float(float(rec["val_nll_after_T"] or float("nan")))})
        return output(rec_df(rec, context, REAL_ONLY), md)

    return [real_classifier]
