"""prompt_suffixes (Diff-II): ≤10 prompt suffixes summarised by the LLM from the captions."""
import dagster as dg
import pandas as pd

from ..resources import LLM
from .common import Experiment, md_table, output, stage_asset


def build(exp: Experiment) -> list:
    cfg = exp.cfg

    @stage_asset(exp, "prompt_suffixes", ins={"captions": "captions"}, resources=("llm",),
        code_version=exp.code_version(("models", "llm"), ("dataset", "metaclass")), kinds={"openai"},
        description="Diff-II suffixes: one greedy BLIP caption per train image, ≤200 of them summarised (ALIA-style meta-prompt) into ≤10 'a photo of a <metaclass> <suffix>'; "
                    "offline: the captions' most frequent context phrases.",
    )
    def prompt_suffixes(context: dg.AssetExecutionContext, captions: pd.DataFrame, llm: LLM) -> dg.Output:
        from ...stages.suffixes import greedy_captions, suffix_rows

        client = llm.client()
        client.check_ready()
        rows = suffix_rows(greedy_captions(captions), cfg.dataset.metaclass, client, seed=cfg.seed)
        df = pd.DataFrame(rows, columns=["idx", "suffix", "prompt", "prompt_source", "provider", "model", "response_id",
                                         "response_hash", "n_captions", "llm_error"])
        return output(df, {"suffixes": dg.MetadataValue.md(md_table(df[["idx", "prompt", "prompt_source"]])),
                           "api_calls": dg.MetadataValue.int(client.calls)})

    return [prompt_suffixes]
