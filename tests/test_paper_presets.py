"""The paper presets (assets_config/papers/*.yaml) against the papers, through `augment plan --json`.

Each table row is (JSON path in the plan, the paper's value). The value is written from the paper (or, where the
paper is silent, from its reference code, tagged [C]); the comment above each row quotes the sentence it comes
from — the paper's words where ../shared/METHODS.md or the issue quotes them, else METHODS.md's summary of the
paper [P] or the code [C]. Nothing here is read from training.recipes.RECIPES or a method's defaults: a drifting recipe,
default or preset fails the row that names it.
"""
from __future__ import annotations

import json

import pytest

from augment_dagster.cli import main
from augment_dagster.config import DEFAULT_CONFIG_DIR

PAPERS = DEFAULT_CONFIG_DIR / "papers"

DA_FUSION_TI = [
    # METHODS §1 [C]: "TI per class … 1000 steps, batch 4, lr 5e-4 ×scale_lr (=2e-3 effective), constant schedule,
    # no warmup, AdamW (wd 1e-2) … token … initialised from the token 'the'"
    ("concepts.steps", 1000), ("concepts.batch_size", 4), ("concepts.lr", 0.002), ("concepts.init_word", "the"),
    ("concepts.weight_decay", 0.01),
    # METHODS §1 [C] (diffusers' textual_inversion.py, which DA-Fusion runs): z0 is a draw of the VAE posterior
    ("concepts.latents", "sample"),
]
DA_FUSION_CLASSIFIER = [
    # METHODS §1 [C]: "The backbone runs under torch.no_grad, so only the linear head is trained."
    ("classifier.linear_probe", True), ("classifier.backbone", "microsoft/resnet-50"),
    # METHODS §1 [C]: "Adam lr 1e-4, 50 epochs × 200 iters × batch 32, images 256²"
    ("classifier.optimizer", "adam"), ("classifier.lr", 1e-4), ("classifier.schedule", "constant"),
    ("classifier.epochs", 50), ("classifier.steps_per_epoch", 200), ("classifier.epochs_over_data", False),
    ("classifier.image_size", 256),
    # METHODS §1 [C]: "Train augmentation: Resize, HFlip, Rot±15°."
    ("classifier.train_transform", "dafusion"),
    # METHODS §1 [C]: "Eval: mean per-class accuracy … plot.py reports the best epoch (chosen on validation …)"
    ("classifier.headline_metric", "mean_per_class"),
]

TABLES: dict[str, list[tuple[str, object]]] = {
    "dafusion": [
        # METHODS §1 [C]: "StableDiffusionImg2ImgPipeline on CompVis/stable-diffusion-v1-4 (… default PNDM scheduler,
        # 50 steps). Input resized to 512² bilinear, prompt 'a photo of a <cls>', guidance 7.5."
        ("diffusion_model", "CompVis/stable-diffusion-v1-4"),
        ("methods.dafusion.scheduler", "pndm"), ("methods.dafusion.steps", 50), ("methods.dafusion.resolution", 512),
        ("methods.dafusion.guidance_scale", 7.5), ("methods.dafusion.preprocess", "resize"),
        # the img2img pipeline samples the VAE posterior of the guide image (issue 29, item 8)
        ("methods.dafusion.vae_encode", "sample"),
        # METHODS §1 [C]: "Main result ('stacking') = ComposeParallel over t0 ∈ {1.0, 0.75, 0.5, 0.25}, each with p=0.25"
        ("methods.dafusion.method_params.strengths", [0.25, 0.5, 0.75, 1.0]),
        ("methods.dafusion.method_params.fixed_strength", None),
        # METHODS §1 [C]: "The single-t0 variant uses t0=0.5."
        ("methods.dafusion_fixed05.method_params.fixed_strength", 0.5),
        # METHODS §1 [C]: "M = num_synthetic = 10 per real image. (The CLI default is 15; the scripts use 10.)"
        ("methods.dafusion.images_per_real", 10),
        # METHODS §1 [C]: "returns a uniformly random synthetic … with probability α = synthetic_probability = 0.5"
        ("methods.dafusion.synthetic_probability", 0.5),
        # METHODS §1 [C]: "Sampler: RandomSampler(replacement=True …)" (uniform over real images, not class-balanced)
        ("methods.dafusion.classifier.class_balanced", False),
        # METHODS §1 [C]: "for each seed s∈{0..7} and K∈{1,2,4,8,16}"
        ("splits.shots", [1, 2, 4, 8, 16]), ("splits.seeds", [0, 1, 2, 3, 4, 5, 6, 7]),
        # METHODS §10: Real-Guidance (He et al.): "img2img of a real image, prompt 'a photo of a {class name}', t0=0.5, w=7.5"
        ("methods.real_guidance.method_params.strength", 0.5), ("methods.real_guidance.guidance_scale", 7.5),
        ("methods.real_guidance.vae_encode", "mode"),
    ] + [(f"methods.dafusion.{k}", v) for k, v in DA_FUSION_TI + DA_FUSION_CLASSIFIER]
      + [("methods.dafusion.classifier.batch_size", 32)],

    "diagen": [
        # METHODS §2: "Base settings as in DA-Fusion: SD v1-4 and the same TI settings. Seeds {0,1,2}, K ∈ {2,4,8}."
        ("diffusion_model", "CompVis/stable-diffusion-v1-4"),
        ("splits.shots", [2, 4, 8]), ("splits.seeds", [0, 1, 2]),
        # METHODS §2 [C]: "Hyperparameters … t0=0.7, w=15, α=0.7, M=10"
        ("methods.diagen.scheduler", "pndm"), ("methods.diagen.steps", 50),
        ("methods.diagen.method_params.strength", 0.7), ("methods.diagen.guidance_scale", 15.0),
        ("methods.diagen.synthetic_probability", 0.7), ("methods.diagen.images_per_real", 10),
        ("methods.diagen.vae_encode", "sample"),  # DIAGen's code runs DA-Fusion's img2img pipeline
        # METHODS §2a [C]: "σ ∈ {0.005, 0.01, 0.025} (these are standard deviations)"
        ("methods.diagen.concepts.noise_sigmas", [0.005, 0.01, 0.025]),
        # METHODS §14: "DIAGen weight from confidence q | w = q (paper)"
        ("methods.diagen.method_params.weighting", "paper"),
        ("methods.diagen_code_weights.method_params.weighting", "code"),
        # METHODS §2c [C]: "The filter is a frozen-backbone ResNet-50 plus a linear head (same model as the
        # classifier), trained on the K real shots with RandAugment. Adam lr 1e-4, wd 1e-2, ≤50 epochs × 200 iters
        # × batch 32 … Early stopping on val loss with patience 6."
        ("methods.diagen.filter.backbone", "microsoft/resnet-50"), ("methods.diagen.filter.linear_probe", True),
        ("methods.diagen.filter.optimizer", "adam"), ("methods.diagen.filter.lr", 1e-4),
        ("methods.diagen.filter.weight_decay", 0.01), ("methods.diagen.filter.epochs", 50),
        ("methods.diagen.filter.steps_per_epoch", 200), ("methods.diagen.filter.batch_size", 32),
        ("methods.diagen.filter.patience", 6), ("methods.diagen.filter.train_transform", "randaugment"),
        # METHODS §2c [C]: "q = mean over 5 stochastic train-transform views of softmax(z/T)[y]"
        ("methods.diagen.filter.views", 5),
        # METHODS §2 [C]: "Classifier and eval: identical to DA-Fusion" with batch 16 (CLI default) and a
        # "class-balanced WeightedRandomSampler"
        ("methods.diagen.classifier.batch_size", 16), ("methods.diagen.classifier.class_balanced", True),
        # DA-Fusion as DIAGen compares with it — issue 29 item 4 (DIAGen Fig. 3: "DA-Fusion's own t0 stacking,
        # g 7.5, α 0.5"; Fig. 5: "t0 0.7, g 15, α 0.7 for both")
        ("methods.dafusion_fig3.method_params.strengths", [0.25, 0.5, 0.75, 1.0]),
        ("methods.dafusion_fig3.method_params.fixed_strength", None),
        ("methods.dafusion_fig3.guidance_scale", 7.5), ("methods.dafusion_fig3.synthetic_probability", 0.5),
        ("methods.dafusion_fig5.method_params.fixed_strength", 0.7),
        ("methods.dafusion_fig5.guidance_scale", 15.0), ("methods.dafusion_fig5.synthetic_probability", 0.7),
        ("methods.dafusion_fig3.images_per_real", 10), ("methods.dafusion_fig5.images_per_real", 10),
    ] + [(f"methods.diagen.{k}", v) for k, v in DA_FUSION_TI + DA_FUSION_CLASSIFIER],

    "diff_ii": [
        # METHODS §3.1 [C]: "SD v1.5 with jointly trained TI … and a LoRA of rank 10 shared by all classes. lr 5e-5
        # constant, 35 000 steps, batch 2"
        ("diffusion_model", "runwayml/stable-diffusion-v1-5"),
        ("methods.diff_ii.concepts.rank", 10), ("methods.diff_ii.concepts.steps", 35000),
        ("methods.diff_ii.concepts.lr", 5e-5), ("methods.diff_ii.concepts.batch_size", 2),
        ("methods.diff_ii.lora_steps", 35000),
        # METHODS §3.2 [C]: "DDIMInverseScheduler, 200 steps, CFG scale 1"
        ("methods.diff_ii.inversion_steps", 200),
        # METHODS §3.5 [C]: "DDIM with 25 steps, CFG 7.5, starting from z" (the circle interpolation of inversions)
        ("methods.diff_ii.scheduler", "ddim"), ("methods.diff_ii.steps", 25), ("methods.diff_ii.guidance_scale", 7.5),
        ("methods.diff_ii.start_rule", "latents"),
        # Diff-II paper: "0.3 for 5-shot and 0.1 for 10-shot" (split ratio s)
        ("methods.diff_ii.method_params.split_ratio_by_shots", {"5": 0.3, "10": 0.1}),
        # METHODS §3.6 [C]: "Expansion rate 5: per class, 5×(#real) images"
        ("methods.diff_ii.images_per_real", 5),
        # METHODS §3: "with probability syn_p each real sample is replaced … The paper uses 0.5"
        ("methods.diff_ii.synthetic_probability", 0.5),
        # METHODS §3 [C]: "ResNet-50 | torchvision IMAGENET1K_V1 | 224 (256) | 0.1 car/aircraft, 0.05 CUB … | 128 | 256"
        # "Common to both: full fine-tuning, SGD momentum 0.9, wd 5e-4, label smoothing 0.1, cosine schedule with
        # 10% linear warmup (per step), RandomCrop with pad 8 + HFlip"
        ("methods.diff_ii.classifier.full_fine_tune", True), ("methods.diff_ii.classifier.optimizer", "sgd"),
        ("methods.diff_ii.classifier.lr", 0.05), ("methods.diff_ii.classifier.momentum", 0.9),
        ("methods.diff_ii.classifier.weight_decay", 5e-4), ("methods.diff_ii.classifier.label_smoothing", 0.1),
        ("methods.diff_ii.classifier.schedule", "cosine"), ("methods.diff_ii.classifier.warmup_frac", 0.1),
        ("methods.diff_ii.classifier.epochs", 128), ("methods.diff_ii.classifier.epochs_over_data", True),
        ("methods.diff_ii.classifier.batch_size", 256), ("methods.diff_ii.classifier.image_size", 224),
        ("methods.diff_ii.classifier.train_transform", "pad_crop"),
        # METHODS §3 [C]: "The reported number is the max test accuracy over epochs" -> top-1 (selected on val here)
        ("methods.diff_ii.classifier.headline_metric", "top1"),
        ("methods.diff_ii_no_concepts.start_rule", "noise"), ("methods.diff_ii_no_concepts.lora_steps", None),
        ("splits.shots", [5, 10]),
    ],

    "genie": [
        # METHODS §4 [C]: "runwayml/stable-diffusion-v1-5, fp16, DPMSolverMultistep, 50-step schedule, CFG 7.5"
        ("diffusion_model", "runwayml/stable-diffusion-v1-5"),
        ("methods.genie.scheduler", "dpmsolver"), ("methods.genie.steps", 50), ("methods.genie.guidance_scale", 7.5),
        # METHODS §4 [C]: "Source image: Resize 512 + CenterCrop 512 → z0 = 0.18215·mode(enc). Noise is added at
        # t=⌊1000r⌋ … skips steps with t−1 > 1000r"
        ("methods.genie.preprocess", "center_crop"), ("methods.genie.vae_encode", "mode"),
        ("methods.genie.start_rule", "genie"), ("methods.genie.resolution", 512),
        # METHODS §4: "Default r=0.8"; GeNIe: "GeNIe generates augmented images for each class using images from all
        # other classes as the source image"
        ("methods.genie.method_params.ratio", 0.8), ("methods.genie.method_params.sources", "all"),
        # METHODS §4 [C]: "Grid r ∈ {0.5,0.6,0.7,0.8,0.9}"
        ("methods.genie_ada.method_params.ratios", [0.5, 0.6, 0.7, 0.8, 0.9]),
        # issue 29 item 7: "the paper uses one generation setup for all of them" (Img2Img^L/^H, Txt2Img, GeNIe)
        *[(f"methods.{b}.{k}", v) for b in ("img2img_low", "img2img_high", "txt2img")
          for k, v in (("scheduler", "dpmsolver"), ("steps", 50), ("guidance_scale", 7.5), ("resolution", 512))],
        *[(f"methods.{b}.{k}", v) for b in ("img2img_low", "img2img_high")
          for k, v in (("start_rule", "genie"), ("preprocess", "center_crop"), ("vae_encode", "mode"))],
        # METHODS §10: "Img2Img^L / ^H | same-class SDEdit with r=0.3 / 0.7"; "Txt2Img … (GeNIe: r≈1)"
        ("methods.img2img_low.method_params.strength", 0.3), ("methods.img2img_high.method_params.strength", 0.7),
        ("methods.txt2img.start_rule", "noise"),
        # GeNIe §4.1: "The support-set contains N randomly sampled classes where each class contains K samples …
        # we sample 16-shots per class for the query set … 600 and 1000 episodes" (5-way 1-shot and 5-shot)
        *[(f"methods.{m}.evaluation.{k}", v) for m in ("genie", "genie_ada")
          for k, v in (("n_way", 5), ("queries", 16), ("episodes", 600), ("shots", [1, 5]))],
        ("methods.genie.evaluation.kind", ["classifier", "few_shot_episodes"]),
        # GeNIe §4.1: a fresh support per episode ("The support-set contains N randomly sampled classes where each
        # class contains K samples"); "we generate 4 samples per class … in the 5-way, 1-shot setting and 20
        # samples per class … 5-way, 5-shot"; "the total number of labeled samples in the support set after
        # augmentation remains the same across all … methodologies" (so the baselines too)
        *[(f"methods.{m}.evaluation.support", "episode") for m in ("genie", "img2img_low", "txt2img")],
        *[(f"methods.{m}.evaluation.augmented_per_class", {"1": 4, "5": 20})
          for m in ("genie", "genie_ada", "img2img_low", "img2img_high", "txt2img")],
    ],

    "sgid": [
        # METHODS §5.7: "Img2img on SD v1.5 with strength n ∈ {0.3, 0.5, 0.7} … M=1 augmented image per original.
        # 50 steps [I, diffusers default]"
        ("diffusion_model", "runwayml/stable-diffusion-v1-5"),
        ("methods.sgid.scheduler", "pndm"), ("methods.sgid.steps", 50), ("methods.sgid.images_per_real", 1),
        ("methods.sgid.method_params.strength", 0.5),
        # METHODS §5.5: "multiply the embeddings of the label tokens by w_l=1.5 and of the caption tokens by w_c=0.9"
        ("methods.sgid.method_params.label_weight", 1.5), ("methods.sgid.method_params.caption_weight", 0.9),
        # METHODS §5.6: "Guidance mapping: g = f(s*) = −4s*² + 2s* + 1"
        ("methods.sgid.guidance_rule", "f(s*) per image"), ("methods.sgid.guidance_scale", None),
        # METHODS §5.3: "Optional CLIP filter: CLIP ViT-B/32 cosine similarity"
        ("models.clip", "openai/clip-vit-base-patch32"),
        # METHODS §5: "5 seeds, t-test p<0.05"
        ("splits.seeds", [0, 1, 2, 3, 4]),
        # METHODS §5: "ResNet-50 is trained from scratch (full training)"; "The main rows (Table 1 …) have no
        # RandAugment"
        ("methods.sgid.classifier.backbone", "microsoft/resnet-50"), ("methods.sgid.classifier.pretrained", False),
        ("methods.sgid.classifier.full_fine_tune", True), ("methods.sgid.classifier.synthetic_transform", "none"),
        ("real_only.classifier.pretrained", False), ("real_only.classifier.synthetic_transform", "none"),
        # SGID footnote 7 (METHODS §5): '"+ SGID & RA" (75.50) is a separate row: RandAugment applied to SGID's
        # augmented images'
        ("methods.sgid_ra.algorithm", "sgid"), ("methods.sgid_ra.classifier.synthetic_transform", "randaugment"),
        ("methods.sgid_ra.classifier.train_transform", "crop"),
        # Table 1 "RandAugment" row: RandAugment copies of the real images
        ("methods.standard.method_params.policy", "randaugment"), ("methods.standard.images_per_real", 1),
    ],
}
# SGID's two pre-trained backbones (METHODS §5): "the two pre-trained backbones (ViT IN-21k, CLIP-ViT LAION-2B)
# are the linear-probing setting"
for variant, backbone in (("sgid_vit", "google/vit-base-patch16-224-in21k"),
                          ("sgid_clip", "laion/CLIP-ViT-B-32-laion2B-s34B-b79K")):
    TABLES[variant] = [
        (f"methods.{m}.classifier.{k}", v) for m in ("sgid", "sgid_ra")
        for k, v in (("backbone", backbone), ("pretrained", True), ("linear_probe", True))
    ] + [("real_only.classifier.linear_probe", True), ("real_only.classifier.synthetic_transform", "none"),
         ("methods.sgid.classifier.synthetic_transform", "none"),
         ("methods.sgid_ra.classifier.synthetic_transform", "randaugment"),
         ("methods.sgid.steps", 50), ("methods.sgid.images_per_real", 1)]


def _plan_json(name: str, capsys) -> dict:
    assert main(["plan", "--config", str(PAPERS / f"{name}.yaml"), "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def _get(d, path: str):
    for part in path.split("."):
        assert isinstance(d, dict) and part in d, f"{path}: no {part!r} in the plan"
        d = d[part]
    return d


@pytest.mark.parametrize("preset", sorted(TABLES))
def test_plan_of_paper_preset_matches_the_paper(preset, capsys):
    plan = _plan_json(preset, capsys)
    wrong = [f"{path}: plan {_get(plan, path)!r}, paper {want!r}" for path, want in TABLES[preset]
             if _get(plan, path) != want]
    assert not wrong, "\n".join(wrong)


def test_preset_values_come_from_where_the_plan_says(capsys):
    """The sources column: the paper's protocol resolves from the method (not typed into the preset), the
    classifier from its recipe, and what the preset sets is labelled 'paper preset'."""
    d = _plan_json("diagen", capsys)["methods"]
    assert d["diagen"]["sources"]["scheduler"]["from"] == "method"
    assert d["diagen"]["sources"]["classifier"]["optimizer"] == {"from": "recipe", "at": "RECIPES['diagen']"}
    assert d["dafusion_fig5"]["sources"]["guidance_scale"]["from"] == "paper preset"
    assert d["dafusion_fig5"]["sources"]["synthetic_probability"]["from"] == "paper preset"
    assert d["diagen"]["sources"]["synthetic_probability"]["from"] == "method"  # DIAGen's α 0.7


def test_diff_ii_epochs_are_over_the_data(capsys):
    """128 epochs at batch 256 are 128·⌈n/256⌉ steps, not 128 steps (issue 29 item 5)."""
    assert main(["plan", "--config", str(PAPERS / "diff_ii.yaml"), "--json", "--classes", "200",
                 "--train-per-class", "30"]) == 0
    w = json.loads(capsys.readouterr().out)["methods"]["diff_ii"]["work"]["per_split"]
    by_k = {s["shots"]: s for s in w}
    assert by_k[5]["real_train_images"] == 1000 and by_k[5]["classifier_steps"] == 128 * 4  # ⌈1000/256⌉ = 4
    assert by_k[10]["real_train_images"] == 2000 and by_k[10]["classifier_steps"] == 128 * 8


@pytest.mark.parametrize("shots, switch_t", [(5, 700), (10, 900), (3, 800)])
def test_diff_ii_split_ratio_per_k_reaches_the_units(shots, switch_t):
    """Diff-II: "0.3 for 5-shot and 0.1 for 10-shot": the preset's split_ratio_by_shots picks s from the split's K
    (suffixed prompt for t ≥ 1000(1 − s)); a K not listed uses split_ratio (0.2 here)."""
    import pandas as pd
    import torch

    from augment_dagster.methods.base import MethodInputs
    from augment_dagster.methods.protocol import given
    from augment_dagster.methods.registry import get_method

    split = pd.DataFrame([{"image_id": f"{c}{i}", "label": c, "role": "train", "rank": i}
                          for c in "ab" for i in range(shots)])
    inv = pd.DataFrame([{"image_id": r, "label": r[0], "latent_blob": f"z{r}"} for r in split["image_id"]])
    lora = pd.DataFrame([{"kind": "token", "label": c, "token": f"<{c}>", "blob": f"t{c}"} for c in "ab"]
                        + [{"kind": "lora", "label": None, "token": None, "blob": "L"}])
    spec = get_method("diff_ii")
    params = spec.Params(expansion_rate=1, split_ratio=0.2, split_ratio_by_shots={5: 0.3, 10: 0.1})
    inp = MethodInputs(method="diff_ii", split=split, params=params, images_per_real=1, protocol=given(guidance_scale=7.5, steps=25),
                       seed=0, inversion_pool=inv, concept_lora=lora,
                       prompt_suffixes=pd.DataFrame([{"idx": 0, "suffix": "at night"}]),
                       extra={"load_tensor": lambda b: torch.ones(4, 8, 8)})
    units = spec.plan(inp)
    assert len(units) == 2 * shots and {u.switch_t for u in units} == {switch_t}
    assert {u.params["split_ratio"] for u in units} == {round(1 - switch_t / 1000, 1)}


def test_full_dataset_split_keeps_the_validation_images():
    """SGID trains on full datasets (a K larger than any class, fewer_than_k: use_all): the split keeps val_per_class
    images of each class for validation (it used to keep 1); a few-shot K short of K + V still keeps its K shots."""
    import pandas as pd

    from augment_dagster.data.splits import few_shot_split

    imgs = pd.DataFrame([{"image_id": f"{c}{i}", "label": c, "pool": "train"} for c, n in (("a", 41), ("b", 3))
                         for i in range(n)])
    s = few_shot_split(imgs, 100000, 0, 5, fewer_than_k="use_all")
    n = s.groupby(["label", "role"]).size().to_dict()
    assert n[("a", "train")] == 36 and n[("a", "val")] == 5
    assert n[("b", "train")] == 2 and n[("b", "val")] == 1  # a class no larger than V: as before, 1 val image
    few = few_shot_split(imgs, 4, 0, 10000, fewer_than_k="use_all").groupby(["label", "role"]).size().to_dict()
    assert few[("a", "train")] == 4 and few[("a", "val")] == 37 and few[("b", "train")] == 2 and few[("b", "val")] == 1


def test_genie_preset_names_its_benchmark_classes_and_their_words():
    """GeNIe §4.1 evaluates on mini-ImageNet's novel classes (Ravi & Larochelle's split: 20 test classes); the
    preset's class split holds exactly those, and the prompts' class words are words, never WordNet ids."""
    from augment_dagster.config import load_config
    from augment_dagster.data.classes import class_words

    cfg = load_config(PAPERS / "genie.yaml")
    ids = cfg.dataset.evaluation_classes()
    assert len(ids) == 20 and len(set(ids)) == 20 and all(i.startswith("n") and i[1:].isdigit() for i in ids)
    words = class_words(ids, cfg.dataset.class_names, clean=True)
    assert not any(w[1:].isdigit() for w in words.values())
    assert words["n02099601"] == "golden retriever" and words["n07613480"] == "trifle"
