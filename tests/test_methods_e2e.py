"""Every method family through Dagster on a tiny config (DIAGen + ablation, Diff-II, GeNIe/Ada, SGID,
Real-Filter, Img2Img^L): lineage fields, rerun computes nothing and calls no LLM; plus unit tests of the
pieces those methods add (noise draws, LoRA gradients, 1-image Diff-II class, Real-Filter's drop)."""
import json
import os

import dagster as dg
import numpy as np
import pandas as pd
import pytest
import torch

from augment_dagster.config import parse_config
from augment_dagster.definitions import build_definitions

CFG = {
    "experiment": "allm",
    "dataset": {"source": "builtin", "builtin": {"classes": ["circle", "square", "star"], "train_per_class": 6,
                                                  "test_per_class": 3, "ood_per_class": 2}},
    "splits": {"shots": [2], "seeds": [0], "val_per_class": 1},
    "models": {"diffusion": {"source": "tiny-random"}},
    "generation": {"images_per_real": 1, "steps": 5, "batch_size": 32},
    "concepts": {"steps": 3, "batch_size": 2},
    "concept_lora": {"steps": 3, "rank": 2, "batch_size": 2},
    "inversion": {"steps": 5},
    "prompts": {"per_class": 3},
    "training": {"epochs": 1, "steps_per_epoch": 2, "batch_size": 8},
    "methods": {"diagen": {}, "diagen_noise": {"method": "diagen", "params": {"use_llm": False, "weighting": "none"}},
                "diagen_resample": {"method": "diagen", "params": {"use_llm": False, "resample_per_image": True}},
                "diff_ii": {"params": {"expansion_rate": 2}}, "genie": {}, "genie_ada": {}, "sgid": {},
                "genie_topk": {"method": "genie", "params": {"sources": "confusion_topk", "topk": 1}},
                "real_filter": {}, "img2img_low": {}},
    "mlflow": {"enabled": False},
}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("allm")
    old = os.environ.get("AUGMENT_DATA_DIR")
    os.environ["AUGMENT_DATA_DIR"] = str(root / "data")
    cfg = parse_config(CFG)
    defs = build_definitions([cfg])
    (root / "dh").mkdir()
    with dg.instance_for_test(temp_dir=str(root / "dh")) as inst:
        def go(force=False):  # the `augment run` plan; metadata keyed by the asset path below the experiment
            from augment_dagster.running import materialize_experiment

            meta = materialize_experiment(defs, cfg, inst, force=force)
            return {k.split("[")[0].split("/", 1)[1]: md for k, md in meta.items()}
        first = go()
        second = go(force=True)  # `augment run --force`: every asset executes, units reused
        yield first, second, root / "data"
    if old is None:
        os.environ.pop("AUGMENT_DATA_DIR", None)
    else:
        os.environ["AUGMENT_DATA_DIR"] = old


def manifest(data, *path):
    return pd.read_parquet(data.joinpath("manifests", "allm", *path[:-1], f"{path[-1]}.parquet"))


def test_every_method_materializes_with_lineage(run):
    first, second, data = run
    for m in CFG["methods"]:
        assert first[f"synthetic/{m}"]["images"] > 0, m
        assert f"metrics/{m}" in first and f"set_metrics/{m}" in first
    dg_ = manifest(data, "synthetic", "diagen", "2shot-s0")
    p = [json.loads(x) for x in dg_["params_json"]]
    assert {x["sigma"] for x in p} == {0.0, 0.005}  # 2 images x M=1 per class: counter 0, 1
    assert set(dg_["prompt_source"]) <= {"offline", "cache:offline"}
    rs = manifest(data, "synthetic", "diagen_resample", "2shot-s0")
    rp = [json.loads(x) for x in rs["params_json"]]
    cons = manifest(data, "concept_embeddings", "2shot-s0")
    base = dict(zip(cons[cons["variant"] == "base"]["label"], cons[cons["variant"] == "base"]["embedding_id"]))
    assert all(e == base[lb] for e, lb in zip(rs["embedding_id"], rs["label"]))  # every unit starts from S*
    noisy = [x for x in rp if x["sigma"] > 0]
    assert noisy and all(x["noise_draw"] == -2 and "noise_seed" in x for x in noisy)
    d2 = manifest(data, "synthetic", "diff_ii", "2shot-s0")
    pp = [json.loads(x) for x in d2["params_json"]]
    assert all(x["start"] == "circle" and 0 <= x["alpha"] * x["theta"] <= 2 * np.pi + 1e-6 for x in pp)
    assert all(len(g) == 2 for g in d2["guide_ids"]) and d2["switch_prompt"].notna().any()
    ge = manifest(data, "synthetic", "genie", "2shot-s0")
    assert len(ge) == 3 * 2 * 2  # (C-1)·K per class
    tk = manifest(data, "synthetic", "genie_topk", "2shot-s0")  # sources: the top-1 class of the TRAIN confusion
    tp = [json.loads(x) for x in tk["params_json"]]
    assert len(tk) == 3 * 1 * 2 and all(x["source_class"] != x["target_class"] for x in tp)
    assert all(len({x["source_class"] for x in tp if x["target_class"] == t}) == 1 for t in ("circle", "square", "star"))
    ada = manifest(data, "synthetic", "genie_ada", "2shot-s0")
    assert len(ada) == len(ge)
    a0 = json.loads(ada["params_json"].iloc[0])
    assert len(a0["ada_projections"]) == 5 and a0["ada_ratios"] == [0.5, 0.6, 0.7, 0.8, 0.9]
    assert first["synthetic/genie_ada"]["computed"] == 5 * len(ge)
    sg = manifest(data, "synthetic", "sgid", "2shot-s0")
    sp = [json.loads(x) for x in sg["params_json"]]
    assert all(abs(x["guidance"] - (-4 * x["clip_score"] ** 2 + 2 * x["clip_score"] + 1)) < 1e-9 for x in sp)
    assert sg["prompt"].str.startswith("A picture of a ").all()
    w = manifest(data, "confidence_weights", "diagen", "2shot-s0")
    assert w["rule"].iloc[0] == "paper" and np.allclose(w["weight"], w["q"])
    assert (manifest(data, "confidence_weights", "diagen_noise", "2shot-s0")["weight"] == 1.0).all()
    rf = first["synthetic/real_filter"]["filter"]
    assert rf["kept"] + rf["dropped"] == 2 * 3


def test_rerun_computes_nothing_and_calls_no_llm(run):
    first, second, data = run
    for k, md in second.items():
        if "computed" in md:
            assert md["computed"] == 0, k
    assert second["class_prompts"]["api_calls"] == 0


def test_noise_draws_reproducible_by_seed(tmp_path):
    from augment_dagster.methods.diagen import noise_variants
    from augment_dagster.store.tensors import tensor_bytes, tensor_from_bytes
    from augment_dagster.store import BlobStore

    blobs = BlobStore(tmp_path)
    base = {"label": "cat", "token": "<cat>", "embedding_id": blobs.put(tensor_bytes(torch.ones(32)), "safetensors"),
            "reused": False}
    a = noise_variants([base], blobs=blobs, sigmas=[0.01, 0.025], seed=3)
    b = noise_variants([base], blobs=blobs, sigmas=[0.01, 0.025], seed=3)
    c = noise_variants([base], blobs=blobs, sigmas=[0.01, 0.025], seed=4)
    assert [r["embedding_id"] for r in a] == [r["embedding_id"] for r in b]
    assert [r["embedding_id"] for r in a] != [r["embedding_id"] for r in c]
    v = tensor_from_bytes(blobs.get(a[1]["embedding_id"]))
    assert a[1]["token"] == "<cat_0.025>" and abs(float((v - 1).std()) - 0.025) < 0.01


def test_lora_and_token_are_the_only_trainable_parts(tmp_path):
    """Diff-II concepts: the LoRA weights change, the base UNet weights and all other token rows do not."""
    from augment_dagster.stages.concept_lora import learn_concepts_lora
    from augment_dagster.models.loading import load_diffusion
    from augment_dagster.data.builtin import generate_pool

    b = load_diffusion("tiny-random", tmp_path)
    base_unet = {k: v.clone() for k, v in b.pipe.unet.state_dict().items()}
    ims = {c: [im for im, _ in generate_pool("train", c, 2, 0, 32)] for c in ("circle", "star")}
    r = learn_concepts_lora(b, ims, {"circle": "<circle>", "star": "<star>"}, steps=4, rank=2, batch_size=2, lr=1e-2)
    assert r.lora_state and all("lora" in k for k in r.lora_state)
    from augment_dagster.stages.concepts import LORA_TARGETS

    assert any(k.endswith("lora_B.weight") and float(v.abs().sum()) > 0 for k, v in r.lora_state.items())
    assert all(torch.equal(base_unet[k], v) for k, v in b.pipe.unet.state_dict().items())
    # the LoRA is a function of its seed and inputs, not of the global RNG state the process happens to be in
    runs = []
    for global_seed in (1, 2):
        torch.manual_seed(global_seed)
        runs.append(learn_concepts_lora(b, ims, {"circle": "<circle>", "star": "<star>"}, steps=2, rank=2,
                                        batch_size=2, lr=1e-2, seed=5).lora_state)
    assert runs[0].keys() == runs[1].keys() and all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])
    assert all(float((r.vectors[t] - r.init_vectors[t]).norm()) > 0 for t in r.vectors)
    assert LORA_TARGETS == ["to_q", "to_k", "to_v", "to_out.0"]


def test_diff_ii_one_image_class_starts_from_noise():
    from augment_dagster.methods.base import MethodInputs
    from augment_dagster.methods.protocol import given
    from augment_dagster.methods.registry import get_method

    split = pd.DataFrame([{"image_id": "a0", "label": "a", "role": "train", "rank": 0},
                          {"image_id": "b0", "label": "b", "role": "train", "rank": 0},
                          {"image_id": "b1", "label": "b", "role": "train", "rank": 1}])
    inv = pd.DataFrame([{"image_id": i, "label": i[0], "latent_blob": f"z{i}"} for i in ("a0", "b0", "b1")])
    lora = pd.DataFrame([{"kind": "token", "label": l, "token": f"<{l}>", "blob": f"t{l}"} for l in "ab"]
                        + [{"kind": "lora", "label": None, "token": None, "blob": "L"}])
    suf = pd.DataFrame([{"idx": 0, "suffix": "at night"}])
    spec = get_method("diff_ii")
    inp = MethodInputs(method="diff_ii", split=split, params=spec.Params(expansion_rate=2), images_per_real=1,
                       protocol=given(guidance_scale=7.5, steps=25), seed=0, inversion_pool=inv, concept_lora=lora, prompt_suffixes=suf,
                       extra={"load_tensor": lambda b: torch.randn(4, 8, 8, generator=torch.Generator().manual_seed(len(b)))})
    units = spec.plan(inp)
    a = [u for u in units if u.label == "a"]
    b = [u for u in units if u.label == "b"]
    assert len(a) == 2 and all(u.mode == "txt2img" and u.params["start"] == "noise" for u in a)
    assert len(b) == 4 and all(u.mode == "latents" and u.latent_recipe["op"] == "circle" for u in b)
    assert all(u.switch_t == 700 and u.prompt.endswith("at night") and u.switch_prompt == "a photo of a <b> shape" for u in b)
    assert all(u.lora_blob == "L" for u in units)
    # the paper's "without concept learning": N(0, I) start, template prompt, no token, no LoRA, no inversion
    inp.params = spec.Params(expansion_rate=2, use_concepts=False)
    nc = spec.plan(inp)
    assert len(nc) == 6 and all(u.mode == "txt2img" and u.lora_blob is None and not u.concepts for u in nc)
    assert all(u.latent_recipe is None and u.init_latents_blob is None and u.switch_prompt is None for u in nc)
    assert {u.prompt for u in nc} == {"a photo of a a shape", "a photo of a b shape"}
    assert all(u.params["ablation"] == "no_concepts" and u.params["start"] == "noise" for u in nc)


def test_diff_ii_suffixes_from_one_greedy_caption_per_image():
    from augment_dagster.stages.suffixes import greedy_captions

    caps = pd.DataFrame([{"image_id": i, "idx": k, "strategy": s, "caption": f"{i} {s} {k}"}
                         for i in ("b1", "a0") for k, s in enumerate(["greedy", "beam", "nucleus", "nucleus"])])
    assert greedy_captions(caps) == ["a0 greedy 0", "b1 greedy 0"]
    with pytest.raises(ValueError, match="greedy"):
        greedy_captions(caps[caps["strategy"] != "greedy"])


def test_real_filter_drops_what_clip_labels_otherwise_and_passes_a_class_clip_cannot_see():
    from augment_dagster.methods.base import MethodInputs
    from augment_dagster.methods.protocol import given
    from augment_dagster.methods.registry import get_method

    spec = get_method("real_filter")
    split = pd.DataFrame([{"image_id": f"{c}0", "label": c, "role": "train", "rank": 0} for c in ("cat", "dog", "emu")])
    inp = MethodInputs(method="real_filter", split=split, params=spec.Params(), images_per_real=1, protocol=given(guidance_scale=7.5,
                       steps=5), seed=0)
    rows = [{"synthetic_id": "s1", "label": "cat", "blob": "b1"}, {"synthetic_id": "s2", "label": "dog", "blob": "b2"},
            {"synthetic_id": "s3", "label": "dog", "blob": "b3"}, {"synthetic_id": "s4", "label": "emu", "blob": "b4"}]

    class FakeClip:  # crafted: b3 looks like a cat; CLIP calls every emu (real emu0 too) a dog
        def synthetic_image(self, blob):
            return blob

        def real_image(self, image_id):
            return image_id

        def clip_zero_shot(self, images, classes, template):
            assert classes == ["cat", "dog", "emu"] and template == "a photo of a {}"
            looks = {"b1": 0, "b3": 0, "cat0": 0, "b2": 1, "dog0": 1, "b4": 1, "emu0": 1}
            return np.eye(3)[[looks[im] for im in images]]

    kept, md = spec.post_filter(rows, inp, FakeClip())
    assert [r["synthetic_id"] for r in kept] == ["s1", "s2", "s4"]  # s3 dropped; emu is not judged, so s4 stays
    assert md["dropped"] == 1 and md["kept"] == 3 and md["dropped_per_class"] == {"dog": 1}
    assert md["unjudged_classes"] == ["emu"] and md["clip_recall_on_real_train"] == {"cat": 1.0, "dog": 1.0, "emu": 0.0}
    assert [r["filter_decision"].split(":")[1].strip()[:4] for r in kept] == ["CLIP", "CLIP", "CLIP"]
    assert "not judged" in kept[2]["filter_decision"] and "agrees" in kept[0]["filter_decision"]


def test_real_filter_tops_up_a_class_it_would_empty_with_its_best_scored_image():
    from augment_dagster.methods.base import MethodInputs
    from augment_dagster.methods.protocol import given
    from augment_dagster.methods.registry import get_method

    spec = get_method("real_filter")
    split = pd.DataFrame([{"image_id": f"{c}0", "label": c, "role": "train", "rank": 0} for c in ("cat", "dog")])
    rows = [{"synthetic_id": f"s{i}", "label": "dog", "blob": f"b{i}"} for i in range(3)]
    rows.append({"synthetic_id": "s3", "label": "cat", "blob": "b3"})
    # every dog image looks more like a cat; b1 is the least cat-like one
    p_dog = {"b0": 0.2, "b1": 0.45, "b2": 0.1, "b3": 0.1, "cat0": 0.1, "dog0": 0.9}

    class FakeClip:
        def synthetic_image(self, blob):
            return blob

        def real_image(self, image_id):
            return image_id

        def clip_zero_shot(self, images, classes, template):
            return np.array([[1 - p_dog[im], p_dog[im]] for im in images])

    def run(**params):
        inp = MethodInputs(method="real_filter", split=split, params=spec.Params(**params), images_per_real=1,
                           protocol=given(guidance_scale=7.5, steps=5), seed=0)
        return spec.post_filter(rows, inp, FakeClip())

    kept, md = run()
    assert [r["synthetic_id"] for r in kept] == ["s1", "s3"]
    assert "keep_at_least" in kept[0]["filter_decision"] and "agrees" in kept[1]["filter_decision"]
    assert md["topped_up_classes"] == {"dog": 1} and md["dropped_per_class"] == {"dog": 2} and md["kept"] == 2
    kept, md = run(keep_at_least=2)
    assert [r["synthetic_id"] for r in kept] == ["s0", "s1", "s3"] and md["topped_up_classes"] == {"dog": 2}
    kept, md = run(keep_at_least=0)  # the plain filter: the dog class is emptied
    assert [r["synthetic_id"] for r in kept] == ["s3"] and md["topped_up_classes"] == {} and md["dropped_per_class"] == {"dog": 3}


@pytest.mark.slow
def test_each_method_on_its_papers_protocol_in_one_experiment(tmp_path):
    """DA-Fusion on PNDM-50, Diff-II on DDIM-25 and GeNIe on DPM-Solver++-50 (r = 0.8) side by side in one
    experiment, nothing but M set: each unit's lineage row carries its own scheduler, steps and start."""
    import diffusers

    from augment_dagster.running import materialize_experiment

    cfg = parse_config({
        "experiment": "papers", "data_dir": str(tmp_path / "data"),
        "dataset": {"source": "builtin", "builtin": {"classes": ["circle", "square", "star"], "train_per_class": 4,
                                                      "test_per_class": 2, "ood_per_class": 0}},
        "splits": {"shots": [2], "seeds": [0], "val_per_class": 1},
        "models": {"diffusion": {"source": "tiny-random"}},
        "generation": {"images_per_real": 1, "batch_size": 32},
        "concepts": {"steps": 2, "batch_size": 2}, "concept_lora": {"steps": 2, "rank": 2, "batch_size": 2},
        "inversion": {"steps": 4}, "training": {"epochs": 1, "steps_per_epoch": 1, "batch_size": 8},
        "methods": {"dafusion": {}, "diff_ii": {}, "genie": {}}, "mlflow": {"enabled": False},
    })
    old = os.environ.pop("AUGMENT_DATA_DIR", None)
    (tmp_path / "dh").mkdir()
    try:
        with dg.instance_for_test(temp_dir=str(tmp_path / "dh")) as inst:
            meta = materialize_experiment(build_definitions([cfg]), cfg, inst, methods=["dafusion", "diff_ii", "genie"])
    finally:
        if old is not None:
            os.environ["AUGMENT_DATA_DIR"] = old

    def rows(m):
        return pd.read_parquet(tmp_path / "data" / "manifests" / "papers" / "synthetic" / m / "2shot-s0.parquet")

    # the schedules SD-1.x reference code runs (X.from_config of an SD-1.x config), built here independently
    sd1 = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", set_alpha_to_one=False,
               steps_offset=1, skip_prk_steps=True, clip_sample=False)

    def ts(cls, n):
        s = getattr(diffusers, cls).from_config(sd1)
        s.set_timesteps(n)
        return [int(t) for t in s.timesteps]

    pndm50, ddim25, dpm50 = ts("PNDMScheduler", 50), ts("DDIMScheduler", 25), ts("DPMSolverMultistepScheduler", 50)
    da = rows("dafusion")
    assert len(da) == 6 and set(da["scheduler"]) == {"pndm"} and set(da["steps"]) == {50}
    for r in da.itertuples():  # diffusers img2img: the last int(50·t0) steps of PLMS (which adds one step)
        begin = 50 - int(50 * r.strength)
        assert r.start_rule == "sdedit" and r.start_timestep == r.first_timestep == pndm50[begin]
        assert r.denoise_steps == len(pndm50) - begin
    d2 = rows("diff_ii")
    assert len(d2) == 6 and set(d2["scheduler"]) == {"ddim"} and set(d2["steps"]) == {25}
    assert d2["start_timestep"].isna().all() and set(d2["first_timestep"]) == {ddim25[0]} == {961}
    assert set(d2["denoise_steps"]) == {25}
    ge = rows("genie")
    assert len(ge) == 3 * 2 * 2 and set(ge["scheduler"]) == {"dpmsolver"} and set(ge["steps"]) == {50}
    assert set(ge["start_rule"]) == {"genie"} and set(ge["start_timestep"]) == {800}
    assert set(ge["denoise_steps"]) == {40} and set(ge["first_timestep"]) == {[t for t in dpm50 if t - 1 <= 800][0]}
    assert (ge["first_timestep"] <= 800).all()
    proto = meta["papers/synthetic/genie[2shot-s0]"]["protocol"]
    assert proto["scheduler"] == "dpmsolver" and proto["sources"]["scheduler"] == "paper:genie"
    # UNet image-passes (CFG 7.5 doubles): DA-Fusion Σ(int(50·t0)+1), Diff-II 25, GeNIe 40 per unit
    assert meta["papers/synthetic/genie[2shot-s0]"]["unet_forward_passes"] == 12 * 40 * 2
    assert meta["papers/synthetic/diff_ii[2shot-s0]"]["unet_forward_passes"] == 6 * 25 * 2
    assert meta["papers/synthetic/dafusion[2shot-s0]"]["unet_forward_passes"] == 2 * int(da["denoise_steps"].sum())


def test_inversion_pool_checks_the_reconstruction_of_the_sampled_images_only(tmp_path):
    from augment_dagster.stages.inversion import inversion_stage
    from augment_dagster.store import BlobStore, Memo

    train = pd.DataFrame([{"image_id": f"{c}{i}", "label": c} for c in "ab" for i in range(3)])
    calls = {"regenerated": 0}

    class FakeCore:  # inversion = the image's latent plus noise; regeneration returns what it was given
        def invert(self, imgs, prompts, num_steps, concepts, guidance_scale):
            assert guidance_scale == 1.0 and num_steps == 7
            return [torch.full((4, 2, 2), float(len(i))) for i in imgs]

        def encode_images(self, imgs):
            return [torch.full((4, 2, 2), float(len(i)) + 0.5) for i in imgs]

        def generate_latents(self, reqs):
            calls["regenerated"] += len(reqs)
            return [r.init_latents for r in reqs]

    class Images:
        def real(self, image_id):
            return image_id * 2

    def go(per_class, memo_dir):
        return inversion_stage(train, images=Images(), blobs=BlobStore(tmp_path / "b"), memo=Memo(tmp_path / memo_dir),
                               model_fp="m", core_factory=FakeCore, prompts={"a": "pa", "b": "pb"}, concepts={},
                               load_tensor=None, steps=7, lora_key=None, recon_per_class=per_class)

    rows, stats = go(1, "m1")
    checked = [r["image_id"] for r in rows if r["recon_rel_error"] is not None]
    assert checked == ["a0", "b0"] and calls["regenerated"] == 2 and stats.extra["recon_checked"] == 2
    assert stats.extra["mean_recon_rel_error"] == pytest.approx(0.5 / 4.5)  # |4 - 4.5| / 4.5 per element
    rows, stats = go(None, "m2")
    assert all(r["recon_rel_error"] is not None for r in rows) and calls["regenerated"] == 2 + 6
