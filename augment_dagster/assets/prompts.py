"""class_prompts: per-class LLM prompt sets (DIAGen §2b) through llm.py (openai or offline), cached."""
import dagster as dg
import pandas as pd

from ..config import parse_split_key
from .common import CONTENT_AUTOMATION, Experiment, md_table, output
from .checks import asset_with_checks


def llm_client(exp: Experiment):
    from ..llm import LLMClient

    return LLMClient.from_config(exp.cfg.models.llm, cache_dir=exp.data_dir / "llm_cache", send_seed=exp.cfg.prompts.llm_seed)


def build(exp: Experiment) -> list:
    cfg = exp.cfg

    @asset_with_checks(exp,
        key=exp.key("class_prompts"), group_name=exp.name, owners=["team:augment-dagster"], io_manager_key=exp.io_manager_key,
        partitions_def=exp.partitions, ins={"split": dg.AssetIn(key=exp.key("few_shot_split"))},
        code_version=exp.code_version("prompts", ("models", "llm")), kinds={"openai"},
        automation_condition=CONTENT_AUTOMATION,
        description="LLM prompt sets per class: DIAGen meta-prompt (ask P+5, keep P lines naming the class), "
                    "provider/model/response hash recorded per prompt; responses cached so reruns never call the API.",
    )
    def class_prompts(context: dg.AssetExecutionContext, split: pd.DataFrame) -> dg.Output:
        from ..stages.prompts import class_prompt_rows, topup_counts

        _, seed = parse_split_key(context.partition_key)
        client = llm_client(exp)
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
