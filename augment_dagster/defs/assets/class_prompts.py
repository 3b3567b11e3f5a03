"""class_prompts: per-class LLM prompt sets (DIAGen §2b) through llm.py (openai or offline), cached."""
import dagster as dg
import pandas as pd

from ..resources import LLM
from .common import Experiment, md_table, output, stage_asset


def build(exp: Experiment) -> list:
    cfg = exp.cfg

    @stage_asset(exp, "class_prompts", ins={"split": "few_shot_split"}, resources=("llm",),
        code_version=exp.code_version("prompts", ("models", "llm")), kinds={"openai"},
        description="LLM prompt sets per class: DIAGen meta-prompt (ask P+5, keep P lines naming the class), "
                    "provider/model/response hash recorded per prompt; responses cached so reruns never call the API.",
    )
    def class_prompts(context: dg.AssetExecutionContext, split: pd.DataFrame, llm: LLM) -> dg.Output:
        from ...stages.prompts import class_prompt_rows, topup_counts

        client = llm.client()
        client.check_ready()
        classes = sorted(split.loc[split["role"] == "train", "label"].unique())
        p = cfg.prompts
        rows = class_prompt_rows(classes, client, p.per_class, seed=cfg.seed, uncommon=p.uncommon_settings,
                                 top_up_offline=p.top_up_offline)
        df = pd.DataFrame(rows)
        errors = sorted({e for e in df["llm_error"] if e})
        for e in errors:
            context.log.warning(f"LLM failed, offline fallback used: {e}")
        src = df.groupby("prompt_source").size().to_dict()
        topups = topup_counts(rows)
        if topups:
            context.log.warning(f"class_prompts: the LLM gave fewer than prompts.per_class={p.per_class} usable prompts; "
                                f"offline templates fill {sum(topups.values())} of {len(df)} prompts: {topups}")
        return output(df, {"api_calls": dg.MetadataValue.int(client.calls), "sources": dg.MetadataValue.json(src),
                           "offline_topups": dg.MetadataValue.int(sum(topups.values())),
                           "offline_topups_per_class": dg.MetadataValue.json(topups),
                           "examples": dg.MetadataValue.md(md_table(df.groupby("label").head(2)[["label", "template", "prompt_source"]]))})

    return [class_prompts]
