"""Method plans (pure: no models) — round-robin assignment, seeds, lineage fields, registry."""
import numpy as np
import pandas as pd
import pytest

from augment_dagster.methods.base import MethodInputs, concept_token
from augment_dagster.methods.protocol import given
from augment_dagster.methods.registry import available_methods, get_method
from augment_dagster.training.stage import synthetic_groups, weight_rule


def split(n_per_class=2, classes=("circle", "star")):
    rows = []
    for c in classes:
        for i in range(n_per_class):
            rows.append({"image_id": f"{c}-{i}", "label": c, "role": "train", "rank": i, "path": f"{c}/{i}.png"})
        rows.append({"image_id": f"{c}-val", "label": c, "role": "val", "rank": n_per_class, "path": "v.png"})
    return pd.DataFrame(rows)


def concepts(classes=("circle", "star"), sigmas=(0.005, 0.01, 0.025)):
    rows = []
    for c in classes:
        tok = concept_token(c)
        rows.append({"label": c, "token": tok, "variant": "base", "embedding_id": f"e-{c}", "sigma": 0.0, "draw": -1})
        for s in sigmas:
            rows.append({"label": c, "token": f"{tok[:-1]}_{s}>", "variant": "noise", "embedding_id": f"e-{c}-{s}", "sigma": s, "draw": 0})
    return pd.DataFrame(rows)


def prompts(classes=("circle", "star"), P=3):
    return pd.DataFrame([{"label": c, "idx": i, "template": f"a photo of a {{name}} v{i}", "prompt_source": "offline"}
                         for c in classes for i in range(P)])


def inputs(name, params=None, M=2, **kw):
    spec = get_method(name)
    return spec, MethodInputs(method=name, split=split(), params=spec.Params.model_validate(params or {}), images_per_real=M,
                              protocol=given(guidance_scale=7.5, steps=10), seed=0, **kw)


def test_registry_has_the_methods():
    assert {"dafusion", "diagen", "real_guidance", "txt2img", "img2img_low", "img2img_high", "standard"} <= set(available_methods())
    with pytest.raises(KeyError, match="unknown method"):
        get_method("nope")


def test_img2img_baselines_one_unit_per_real_and_repeat():
    for name, t in (("real_guidance", 0.5), ("img2img_low", 0.3), ("img2img_high", 0.7)):
        spec, inp = inputs(name)
        units = spec.plan(inp)
        assert len(units) == 4 * 2
        assert {u.strength for u in units} == {t}
        assert all(u.guide_ids == (u.init_image_id,) and u.prompt == f"a photo of a {u.label}" for u in units)
        assert len({u.seed for u in units}) == len(units)


def test_seeds_do_not_depend_on_other_images():
    spec, inp = inputs("real_guidance")
    a = {(u.init_image_id, u.params["m"]): u.seed for u in spec.plan(inp)}
    more = pd.concat([split(), pd.DataFrame([{"image_id": "circle-new", "label": "circle", "role": "train", "rank": 9, "path": "x"}])])
    inp2 = MethodInputs(method="real_guidance", split=more, params=inp.params, images_per_real=2, protocol=given(guidance_scale=7.5, steps=10), seed=0)
    b = {(u.init_image_id, u.params["m"]): u.seed for u in spec.plan(inp2)}
    assert all(b[k] == v for k, v in a.items())


def test_txt2img_counts():
    spec, inp = inputs("txt2img", M=3)
    units = spec.plan(inp)
    assert len(units) == 2 * 2 * 3 and all(u.mode == "txt2img" and not u.guide_ids for u in units)


def test_dafusion_strength_drawn_from_set_and_token():
    spec, inp = inputs("dafusion", M=50, concepts=concepts())
    units = spec.plan(inp)
    assert {u.strength for u in units} == {0.25, 0.5, 0.75, 1.0}
    u = units[0]
    assert u.prompt == f"a photo of a {concept_token(u.label)}" and u.concepts == {concept_token(u.label): f"e-{u.label}"}
    spec, inp = inputs("dafusion", {"fixed_strength": 0.5}, concepts=concepts())
    assert {u.strength for u in spec.plan(inp)} == {0.5}


def test_diagen_round_robin_exactly_as_methods_md():
    spec, inp = inputs("diagen", M=3, concepts=concepts(), class_prompts=prompts(P=3))
    units = [u for u in spec.plan(inp) if u.label == "circle"]
    assert len(units) == 6
    names = ["<circle>", "<circle_0.005>", "<circle_0.01>", "<circle_0.025>"]
    for c, u in enumerate(units):
        assert u.params["counter"] == c
        assert list(u.concepts) == [names[c % 4]]
        assert u.prompt == f"a photo of a {names[c % 4]} v{c % 3}"
        assert u.strength == 0.7 and u.guidance_scale == 7.5  # inputs carry the resolved guidance
    assert spec.default_alpha == 0.7 and inp.params.weighting == "paper"


def test_diagen_ablations():
    spec, inp = inputs("diagen", {"use_noise": False}, M=2, concepts=concepts(), class_prompts=prompts())
    assert {tuple(u.concepts) for u in spec.plan(inp)} == {("<circle>",), ("<star>",)}
    spec, inp = inputs("diagen", {"use_llm": False}, M=2, concepts=concepts(), class_prompts=prompts())
    assert all(u.prompt == f"a photo of a {next(iter(u.concepts))}" for u in spec.plan(inp))


def test_diagen_resample_per_image_draws_fresh_noise_per_unit():
    import torch

    from augment_dagster.methods.runner import to_request
    from augment_dagster.models.text import noisy_vector

    spec, inp = inputs("diagen", {"resample_per_image": True}, M=4, concepts=concepts(), class_prompts=prompts())
    units = [u for u in spec.plan(inp) if u.label == "circle"]
    fixed_spec, fixed_inp = inputs("diagen", M=4, concepts=concepts(), class_prompts=prompts())
    fixed = [u for u in fixed_spec.plan(fixed_inp) if u.label == "circle"]
    # same σ round-robin and prompts as the fixed draws; the noisy units now point at the base vector S*
    assert [u.params["sigma"] for u in units] == [u.params["sigma"] for u in fixed]
    assert [u.prompt for u in units] == [u.prompt for u in fixed]
    noisy = [u for u in units if u.params["sigma"] > 0]
    assert noisy and all(u.concepts == {next(iter(u.concepts)): "e-circle"} and u.embedding_id == "e-circle" for u in noisy)
    assert all(u.params["noise_draw"] == -2 and u.concept_noise for u in noisy)
    assert len({u.params["noise_seed"] for u in noisy}) == len(noisy)  # a fresh draw per image
    assert all("concept_noise" not in u.identity() for u in fixed)  # fixed-draw memo keys are unchanged
    # the runner adds σ·ε from the unit's seed to the stored vector
    base = torch.randn(1, 64)
    vecs = []
    for u in noisy:
        req = to_request(u, load_image=lambda _id: None, load_tensor=lambda eid: base.clone())
        (tok, v), = req.concepts.items()
        sigma, nseed = u.concept_noise[tok]
        assert torch.allclose(v, noisy_vector(base, sigma, nseed))
        assert 0 < float((v - base).norm()) < 10 * sigma * 8 + 1e-6  # ~σ·sqrt(64)
        vecs.append(v)
    assert not torch.equal(vecs[0], vecs[1])
    # the σ = 0 unit (S*) gets no noise
    plain = next(u for u in units if u.params["sigma"] == 0)
    req = to_request(plain, load_image=lambda _id: None, load_tensor=lambda eid: base.clone())
    assert torch.equal(next(iter(req.concepts.values())), base)


def test_weight_rules():
    q = np.array([0.1, 0.49, 0.5, 0.9])
    assert np.allclose(weight_rule(q, "paper"), q)
    assert np.allclose(weight_rule(q, "code"), [0.2, 0.98, 1.0, 1.0])
    assert np.allclose(weight_rule(q, "none"), 1.0)
    with pytest.raises(ValueError):
        weight_rule(q, "x")


def test_synthetic_groups_guide_and_class_pool():
    train = split()[lambda d: d.role == "train"].reset_index(drop=True)
    syn = pd.DataFrame({"synthetic_id": list("abcde"), "label": ["circle", "circle", "star", "circle", "star"],
                        "guide_ids": [["circle-0"], ["circle-1"], ["circle-0"], [], ["star-1"]]})
    g = synthetic_groups(train, syn)
    # circle-0: its own guided image (a) + circle pool (d); star images: the cross-class 'c' (guide from circle) is a star pool item
    assert [list(x) for x in g] == [[0, 3], [1, 3], [2], [4, 2]]


def test_synthetic_groups_interpolations_are_a_class_pool():
    """Diff-II (METHODS §3): mixing draws a same-class synthetic uniformly, not grouped by its first endpoint."""
    train = split()[lambda d: d.role == "train"].reset_index(drop=True)
    syn = pd.DataFrame({"synthetic_id": list("abc"), "label": ["circle"] * 3,
                        "guide_ids": [["circle-0", "circle-1"], ["circle-1", "circle-0"], ["circle-0", "circle-1"]]})
    g = synthetic_groups(train, syn)
    circle = [list(x) for x, lab in zip(g, train["label"]) if lab == "circle"]
    assert circle == [[0, 1, 2]] * len(circle)


# ---------------------------------------------------------------- GeNIe / GeNIe-Ada
from augment_dagster.methods.genie import projection, select_ada, select_ratio  # noqa: E402
from augment_dagster.methods.sgid import guidance_from_similarity, pick_caption  # noqa: E402


@pytest.mark.parametrize("d, expect", [
    ([0.0, 0.1, 0.2, 0.9, 1.0], 3),    # largest jump between r=.7 and .8 -> keep .8 (index 3)
    ([0.0, 0.8, 0.85, 0.9, 0.95], 1),  # jump right at the start
    ([0.0, 0.1, 0.2, 0.3, 1.0], 4),    # jump at the end
    ([0.5, 0.5, 0.5, 0.5, 0.5], 1),    # flat trajectory: first index after a (zero) jump
    ([0.0, 0.5, 1.0, 1.5, 2.0], 1),    # ties: the first (lowest r) jump wins
    ([1.0, 0.2, 0.1, 0.0, 0.0], 1),    # uses |Δd|, direction does not matter
])
def test_select_ratio(d, expect):
    assert select_ratio(d, [0.5, 0.6, 0.7, 0.8, 0.9]) == expect


def test_select_ratio_errors():
    with pytest.raises(ValueError):
        select_ratio([1.0], [0.5])
    with pytest.raises(ValueError):
        select_ratio([1.0, 2.0], [0.6, 0.5])


def test_genie_pairing_counts():
    classes = ("a", "b", "c", "d", "e")
    sp = split(n_per_class=3, classes=classes)
    spec = get_method("genie")
    inp = MethodInputs(method="genie", split=sp, params=spec.Params(), images_per_real=1, protocol=given(guidance_scale=7.5, steps=10), seed=0)
    units = spec.plan(inp)
    C, K = 5, 3
    assert len(units) == C * (C - 1) * K
    for c in classes:
        mine = [u for u in units if u.label == c]
        assert len(mine) == (C - 1) * K
        assert all(u.params["source_class"] != c and u.strength == 0.8 and u.prompt == f"a photo of a {c}" for u in mine)
    ada = get_method("genie_ada")
    inp = MethodInputs(method="genie_ada", split=sp, params=ada.Params(), images_per_real=1, protocol=given(guidance_scale=7.5, steps=10), seed=0)
    au = ada.plan(inp)
    assert len(au) == C * (C - 1) * K * 5
    # the 5 candidates of a pair share the seed (only r varies)
    first = [u for u in au if u.guide_ids == au[0].guide_ids and u.label == au[0].label]
    assert len({u.seed for u in first}) == 1 and [u.strength for u in first] == [0.5, 0.6, 0.7, 0.8, 0.9]


def test_genie_confusion_topk():
    import json as _json

    classes = ["a", "b", "c"]
    cm = [[5, 3, 0], [2, 5, 0], [0, 1, 5]]  # a<->b confused
    rc = pd.DataFrame([{"classes": classes, "val_confusion": _json.dumps(cm), "blob": "x"}])
    spec = get_method("genie")
    inp = MethodInputs(method="genie", split=split(2, classes),
                       params=spec.Params(sources="confusion_topk", topk=1, confusion_split="val"),
                       images_per_real=1, protocol=given(guidance_scale=7.5, steps=10), seed=0, real_classifier=rc)
    units = spec.plan(inp)
    assert {u.params["source_class"] for u in units if u.label == "a"} == {"b"}
    assert {u.params["source_class"] for u in units if u.label == "c"} == {"b"}
    # the paper's rule (default): the TRAIN confusion matrix, computed by the prepare step from the real classifier
    train_cm = [[5, 0, 3], [0, 5, 0], [2, 1, 5]]  # on train, a<->c are confused

    class Services:
        def classifier_confusion(self, blob, image_ids, labels):
            assert blob == "x" and len(image_ids) == len(labels) == 6 and set(labels) == set(classes)
            return classes, np.asarray(train_cm)

    inp = MethodInputs(method="genie", split=split(2, classes), params=spec.Params(sources="confusion_topk", topk=1),
                       images_per_real=1, protocol=given(guidance_scale=7.5, steps=10), seed=0, real_classifier=rc)
    with pytest.raises(ValueError, match="train confusion"):
        spec.plan(inp)
    inp.extra.update(spec.prepare(inp, Services()))
    units = spec.plan(inp)
    assert {u.params["source_class"] for u in units if u.label == "a"} == {"c"}
    assert {u.params["source_class"] for u in units if u.label == "b"} == {"c"}  # b: c (1+0) beats a (0+0)


def test_genie_fine_grained_prompt_and_protocol():
    spec = get_method("genie")
    inp = MethodInputs(method="genie", split=split(1, ("a", "b")), params=spec.Params(prompt_style="fine_grained"),
                       images_per_real=1, protocol=given(guidance_scale=7.5, steps=10), seed=0, metaclass="bird")
    assert {u.prompt for u in spec.plan(inp)} == {"A photo of a a, a type of bird", "A photo of a b, a type of bird"}
    assert spec.protocol.preprocess == "center_crop" and spec.protocol.start_rule == "genie"
    assert get_method("genie_ada").Params().encoder == "classifier"


def test_select_ada_keeps_one_per_pair_and_records_projections():
    import json as _json

    zs, zt = np.array([1.0, 0.0]), np.array([0.0, 1.0])
    ratios = [0.5, 0.6, 0.7]
    feats = {"s0": np.array([1.0, 0.0]), "s1": np.array([0.9, 0.1]), "s2": np.array([0.1, 0.9])}
    rows = [{"synthetic_id": f"s{i}", "label": "t", "guide_ids": ["src"], "strength": r, "params_json": "{}"} for i, r in enumerate(ratios)]
    kept = select_ada(rows, feats, {"src": zs, "t0": zt}, {"src": "s", "t0": "t"}, ratios)
    assert len(kept) == 1 and kept[0]["synthetic_id"] == "s2"
    p = _json.loads(kept[0]["params_json"])
    assert p["ada_choice"] == 2 and len(p["ada_projections"]) == 3
    assert np.allclose(projection(np.stack([zs, zt]), zs, zt), [0.0, np.sqrt(2)])


# ---------------------------------------------------------------- SGID
def test_guidance_map():
    assert guidance_from_similarity(0.0) == 1.0
    assert guidance_from_similarity(0.25) == pytest.approx(1.25)
    assert guidance_from_similarity(0.57) == pytest.approx(0.8404)
    assert guidance_from_similarity(1.0) == pytest.approx(-1.0)
    assert guidance_from_similarity(0.57, clamp_min=1.0) == 1.0


def test_sgid_plan_prompt_weights_and_caption_choice():
    caps = []
    for iid in ("circle-0", "circle-1", "star-0", "star-1"):
        caps += [{"image_id": iid, "idx": 0, "strategy": "greedy", "caption": "a thing", "clip_score": 0.2},
                 {"image_id": iid, "idx": 1, "strategy": "beam", "caption": "a red shape", "clip_score": 0.3},
                 {"image_id": iid, "idx": 2, "strategy": "nucleus", "caption": "a shape on stripes", "clip_score": 0.1}]
    spec = get_method("sgid")
    inp = MethodInputs(method="sgid", split=split(), params=spec.Params(), images_per_real=1, protocol=given(guidance_scale=7.5,
                       steps=10), seed=0, captions=pd.DataFrame(caps))
    units = spec.plan(inp)
    assert len(units) == 4
    u = units[0]
    assert u.prompt == [(f"A picture of a {u.label}", 1.5), (", a red shape", 0.9)]  # clip_filter picks s*=0.3
    assert u.guidance_scale == pytest.approx(guidance_from_similarity(0.3)) and u.params["clip_score"] == 0.3
    assert u.strength == 0.5 and u.prompt_text() == f"A picture of a {u.label}, a red shape"
    c = pd.DataFrame(caps)[lambda d: d.image_id == "circle-0"].to_dict("records")
    assert pick_caption(c, "beam", 0)["caption"] == "a red shape"
    assert pick_caption(c, "nucleus", 0)["strategy"] == "nucleus"


def test_confidence_weights_uniform_fallback_for_an_all_zero_class():
    from augment_dagster.training.filter import uniform_fallback

    labels = np.array(["a", "a", "b", "b", "c"])
    w, fb = uniform_fallback(labels, np.array([0.2, 0.0, 0.0, 0.0, np.nan]))
    assert list(fb) == [False, False, True, True, True]
    assert np.allclose(w, [0.2, 0.0, 1.0, 1.0, 1.0])


def test_stage_table_feeds_method_inputs_and_needs():
    """Every stage of the one stage table is a MethodInputs field; a MethodSpec naming another stage is refused."""
    import dataclasses

    from augment_dagster.methods.base import MethodSpec
    from augment_dagster.stages import STAGES

    fields = {f.name for f in dataclasses.fields(MethodInputs)}
    assert set(STAGES) <= fields
    for name in available_methods():
        assert set(get_method(name).needs) <= set(STAGES)
    with pytest.raises(ValueError, match="unknown needs \\['nope'\\]"):
        MethodSpec("x", "1", "x", get_method("txt2img").Params, lambda i: [], needs=("captions", "nope"))


def test_every_method_declares_its_report_family_and_a_known_recipe():
    """MethodSpec.family groups the report's plots (a method without one is its own family, never a baseline);
    MethodSpec.recipe names a row of the training recipe table."""
    from augment_dagster.config import TrainingConfig
    from augment_dagster.report_plots import families, family

    recipes = set(TrainingConfig.model_fields["recipe"].annotation.__args__)
    for name in available_methods():
        spec = get_method(name)
        assert spec.recipe is None or spec.recipe in recipes, name
        assert family(name) == (spec.family or name)
    assert family("real_only") == "baselines" and family("sgid") == "SGID" and family("dafusion") == "DA-Fusion/DIAGen"
    assert families(["mixup_like", "SGID", "baselines"]) == ["baselines", "SGID", "mixup_like"]


def test_methods_stages_models_import_no_cycle():
    """No import cycle among methods/, stages/ and models/ (every import statement counts, also those inside
    functions): the registry resolves protocols, protocol.py imports no method module."""
    import ast
    from pathlib import Path

    import augment_dagster

    root = Path(augment_dagster.__file__).parent
    mods = {}
    for pkg in ("methods", "stages", "models"):
        for p in (root / pkg).glob("*.py"):
            mods[f"{pkg}.{p.stem}" if p.stem != "__init__" else pkg] = p
    graph = {m: set() for m in mods}
    for m, p in mods.items():
        here = m.split(".") if p.stem == "__init__" else m.split(".")[:-1]
        for n in ast.walk(ast.parse(p.read_text())):
            if isinstance(n, ast.ImportFrom) and n.level:
                base = ".".join(here[: len(here) - (n.level - 1)] + ([n.module] if n.module else []))
                graph[m] |= {t for t in [base] + [f"{base}.{a.name}".lstrip(".") for a in n.names] if t in mods and t != m}
    seen: dict[str, int] = {}

    def visit(m, path):
        if seen.get(m) == 1:
            raise AssertionError(f"import cycle: {' -> '.join(path[path.index(m):] + [m])}")
        if seen.get(m) == 2:
            return
        seen[m] = 1
        for t in sorted(graph[m]):
            visit(t, path + [m])
        seen[m] = 2

    for m in sorted(mods):
        visit(m, [])
    assert "methods.protocol" in mods and not graph["methods.protocol"]
