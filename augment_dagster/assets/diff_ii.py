"""Diff-II stages: prompt_suffixes (LLM over captions), concept_lora (TI + shared LoRA), inversion_pool."""
import dagster as dg
import pandas as pd

from ..config import parse_split_key
from ..scaleout import gpu_op_tags
from .common import (CONTENT_AUTOMATION, Experiment, diffusion_bundle, diffusion_fingerprint, generation_core,
                     image_source, md_table, output)
from .checks import asset_with_checks
from .prompts import llm_client


def build(exp: Experiment, needs: set[str]) -> list:
    cfg = exp.cfg
    out = []

    if "prompt_suffixes" in needs:
        @asset_with_checks(exp,
            key=exp.key("prompt_suffixes"), group_name=exp.name, owners=["team:augment-dagster"], io_manager_key=exp.io_manager_key,
            partitions_def=exp.partitions, ins={"captions": dg.AssetIn(key=exp.key("captions"))},
            code_version=exp.code_version(("models", "llm"), ("dataset", "metaclass")), kinds={"openai"},
            automation_condition=CONTENT_AUTOMATION,
            description="Diff-II suffixes: one greedy BLIP caption per train image, ≤200 of them summarised (ALIA-style meta-prompt) into ≤10 'a photo of a <metaclass> <suffix>'; "
                        "offline: the captions' most frequent context phrases.",
        )
        def prompt_suffixes(context: dg.AssetExecutionContext, captions: pd.DataFrame) -> dg.Output:
            from ..stages.suffixes import greedy_captions, suffix_rows

            client = llm_client(exp)
            client.check_ready()
            rows = suffix_rows(greedy_captions(captions), cfg.dataset.metaclass, client, seed=cfg.seed)
            df = pd.DataFrame(rows, columns=["idx", "suffix", "prompt", "prompt_source", "provider", "model", "response_id",
                                             "response_hash", "n_captions", "llm_error"])
            return output(df, {"suffixes": dg.MetadataValue.md(md_table(df[["idx", "prompt", "prompt_source"]])),
                               "api_calls": dg.MetadataValue.int(client.calls)})

        out.append(prompt_suffixes)

    if "concept_lora" in needs or "inversion_pool" in needs:
        @asset_with_checks(exp,
            key=exp.key("concept_lora"), group_name=exp.name, owners=["team:augment-dagster"], io_manager_key=exp.io_manager_key,
            partitions_def=exp.partitions, ins={"split": dg.AssetIn(key=exp.key("few_shot_split"))},
            code_version=exp.code_version("concept_lora", ("models", "diffusion"), ("dataset", "metaclass")),
            kinds={"pytorch", "diffusers"}, pool="gpu", automation_condition=CONTENT_AUTOMATION, op_tags=gpu_op_tags(True, exp.cfg),
            description="Diff-II concepts: one token per class + one LoRA shared by all classes (peft, UNet attention "
                        "projections), trained jointly on all train images; memo key covers every class's images.",
        )
        def concept_lora(context: dg.AssetExecutionContext, split: pd.DataFrame) -> dg.Output:
            from ..stages.concept_lora import concept_lora_stage

            _, seed = parse_split_key(context.partition_key)
            c = cfg.concept_lora
            rows, stats = concept_lora_stage(
                split[split["role"] == "train"], images=image_source(exp, split), blobs=exp.blobs, memo=exp.memo(),
                model_fp=diffusion_fingerprint(exp), bundle_factory=lambda: diffusion_bundle(exp), metaclass=cfg.dataset.metaclass,
                init_word=c.init_word, steps=c.steps, lr=c.lr, rank=c.rank, batch_size=c.batch_size, seed=cfg.seed * 1000 + seed,
                checkpoint_dir=exp.data_dir / "checkpoints" / "concept_lora", progress=True)
            df = pd.DataFrame(rows)
            df["created_by_run"] = context.run_id
            return output(df, {"computed": dg.MetadataValue.int(stats.computed), "reused": dg.MetadataValue.int(stats.reused),
                               "compute_seconds": dg.MetadataValue.float(round(stats.seconds, 3)),
                               **{k: dg.MetadataValue.float(float(v)) for k, v in stats.extra.items()}})

        out.append(concept_lora)

    if "inversion_pool" in needs:
        @asset_with_checks(exp,
            key=exp.key("inversion_pool"), group_name=exp.name, owners=["team:augment-dagster"], io_manager_key=exp.io_manager_key,
            partitions_def=exp.partitions,
            ins={"split": dg.AssetIn(key=exp.key("few_shot_split")), "concept_lora": dg.AssetIn(key=exp.key("concept_lora"))},
            code_version=exp.code_version("inversion", ("models", "diffusion"), ("dataset", "metaclass")),
            kinds={"pytorch", "diffusers"}, pool="gpu", automation_condition=CONTENT_AUTOMATION, op_tags=gpu_op_tags(True, exp.cfg),
            description="DDIM inversion (DDIMInverseScheduler, guidance 1) of every train image with 'a photo of a <cls> <metaclass>' "
                        "on the concept+LoRA model; per-image memo; reconstruction error of invert → regenerate in metadata.",
        )
        def inversion_pool(context: dg.AssetExecutionContext, split: pd.DataFrame, concept_lora: pd.DataFrame) -> dg.Output:
            from ..stages.inversion import inversion_stage

            images = image_source(exp, split)
            toks = concept_lora[concept_lora["kind"] == "token"]
            lora_blob = concept_lora[concept_lora["kind"] == "lora"]["blob"].iloc[0]
            prompts = {r.label: f"a photo of a {r.token} {cfg.dataset.metaclass}".strip() for r in toks.itertuples()}
            rows, stats = inversion_stage(
                split[split["role"] == "train"], images=images, blobs=exp.blobs, memo=exp.memo(),
                model_fp=diffusion_fingerprint(exp), core_factory=lambda: generation_core(exp, lora_blob), prompts=prompts,
                concepts=dict(zip(toks["token"], toks["blob"])), load_tensor=images.tensor, steps=cfg.inversion.steps,
                lora_key=lora_blob, check_recon=cfg.inversion.check_reconstruction,
                recon_per_class=cfg.inversion.reconstruction_per_class)
            df = pd.DataFrame(rows)
            md = {"computed": dg.MetadataValue.int(stats.computed), "reused": dg.MetadataValue.int(stats.reused),
                  "compute_seconds": dg.MetadataValue.float(round(stats.seconds, 3))}
            if stats.extra.get("mean_recon_rel_error") is not None:
                md["mean_recon_rel_error"] = dg.MetadataValue.float(stats.extra["mean_recon_rel_error"])
                md["recon_checked_images"] = dg.MetadataValue.int(int(stats.extra["recon_checked"]))
            return output(df, md)

        out.append(inversion_pool)
    return out
