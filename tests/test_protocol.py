"""Per-method generation protocols (methods/protocol.py) and the paper presets in assets_config/papers/.

The PAPER table is written from METHODS.md §1–§6 (not from the code), so a drifting default fails here."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from augment_dagster.config import DEFAULT_CONFIG_DIR, ConfigError, discover_configs, load_config, parse_config
from augment_dagster.methods.base import SynthUnit
from augment_dagster.methods.protocol import protocol_lines, resolve_protocol

PAPERS = DEFAULT_CONFIG_DIR / "papers"

# METHODS.md §6 "Per-method defaults at a glance" + §1–§5:
# entry -> (scheduler, steps, guidance, M, start rule, method params that are part of the protocol)
PAPER = {
    "dafusion": {"dafusion": ("pndm", 50, 7.5, 10, "sdedit", {"strengths": [0.25, 0.5, 0.75, 1.0]})},
    "diagen": {"diagen": ("pndm", 50, 15.0, 10, "sdedit", {"strength": 0.7})},
    "diff_ii": {"diff_ii": ("ddim", 25, 7.5, 5, "sdedit", {"split_ratio": 0.3})},
    "genie": {"genie": ("dpmsolver", 50, 7.5, None, "genie", {"ratio": 0.8, "sources": "all"}),
              "genie_ada": ("dpmsolver", 50, 7.5, None, "genie", {"ratios": [0.5, 0.6, 0.7, 0.8, 0.9]})},
    "sgid": {"sgid": ("pndm", 50, None, 1, "sdedit", {"strength": 0.5, "label_weight": 1.5, "caption_weight": 0.9})},
}
SD_MODEL = {"dafusion": "CompVis/stable-diffusion-v1-4", "diagen": "CompVis/stable-diffusion-v1-4",
            "diff_ii": "runwayml/stable-diffusion-v1-5", "genie": "runwayml/stable-diffusion-v1-5",
            "sgid": "runwayml/stable-diffusion-v1-5"}
SPLITS = {"dafusion": ([1, 2, 4, 8, 16], list(range(8))), "diagen": ([2, 4, 8], [0, 1, 2])}


@pytest.mark.parametrize("paper", sorted(PAPER))
def test_paper_preset_resolves_to_the_papers_protocol(paper):
    cfg = load_config(PAPERS / f"{paper}.yaml")
    assert cfg.models.diffusion.source == SD_MODEL[paper]
    assert cfg.generation.resolution == 512
    for entry, (sched, steps, g, m, rule, params) in PAPER[paper].items():
        p = resolve_protocol(cfg, entry)
        assert (p.scheduler, p.steps, p.start_rule) == (sched, steps, rule), (paper, entry)
        if g is not None:
            assert p.guidance_scale == g, (paper, entry)
        if m is not None:
            assert p.images_per_real == m, (paper, entry)
        # the preset sets none of these: the paper defaults are what resolves, not a value typed into the file
        assert p.sources["scheduler"].startswith("paper:") and p.sources["steps"].startswith("paper:")
        from augment_dagster.methods.registry import method_params

        prm = method_params(entry, cfg.methods[entry])
        for k, v in params.items():
            assert getattr(prm, k) == v, (paper, entry, k)
    if paper in SPLITS:
        assert (cfg.splits.shots, cfg.splits.seeds) == SPLITS[paper]
    if paper in ("dafusion", "diagen"):  # TI: 1000 steps, batch 4, lr 5e-4 × 4 (scale_lr), init "the"
        c = cfg.concepts
        assert (c.steps, c.batch_size, c.lr, c.init_word) == (1000, 4, 0.002, "the")
    if paper == "diagen":
        assert cfg.concepts.noise_sigmas == [0.005, 0.01, 0.025] and cfg.prompts.per_class == 10
        assert cfg.models.llm.provider == "openai"
    if paper == "diff_ii":  # TI + LoRA rank 10, 35k steps at 5e-5, batch 2; inversion 200 steps
        cl = cfg.concept_lora
        assert (cl.rank, cl.steps, cl.lr, cl.batch_size) == (10, 35000, 5e-5, 2) and cfg.inversion.steps == 200
        assert cfg.models.captioner.source == "Salesforce/blip-image-captioning-large"
        assert "diff_ii_no_concepts" in cfg.methods
    if paper == "sgid":
        assert cfg.models.clip.source == "openai/clip-vit-base-patch32"
    # the classifier / evaluation protocol (METHODS §1–§5), resolved from the preset's recipe
    opt, lr, sched, probe, aug, headline = CLASSIFIER[paper]
    t = cfg.training.resolved()
    assert (t.optimizer, t.lr, t.schedule, bool(t.linear_probe), t.train_aug, t.headline) == \
        (opt, lr, sched, probe, aug, headline), paper
    if paper == "diff_ii":
        assert (t.momentum, t.weight_decay, t.label_smoothing, t.warmup_frac) == (0.9, 5e-4, 0.1, 0.1)
    if paper in ("dafusion", "diagen"):
        assert (t.epochs, t.steps_per_epoch) == (50, 200)
    if paper == "genie":  # GeNIe's episodic protocol: 600 episodes, 16 queries per class, logistic regression
        for entry in ("genie", "genie_ada"):
            te = cfg.training.resolved(cfg.methods[entry].training, algorithm=entry)
            assert "few_shot_episodes" in te.evaluation
            assert (te.episodes.episodes, te.episodes.queries_per_class) == (600, 16)


# METHODS §1–§5 classifier protocols: optimizer, lr, schedule, linear probe, online train aug, headline metric
CLASSIFIER = {
    "dafusion": ("adam", 1e-4, "constant", True, "dafusion", "mean_per_class"),
    "diagen": ("adam", 1e-4, "constant", True, "dafusion", "mean_per_class"),
    "diff_ii": ("sgd", 0.05, "cosine", False, "pad_crop", "top1"),
    "genie": ("adam", 1e-4, "constant", True, "dafusion", "mean_per_class"),
    "sgid": ("adamw", 1e-3, "cosine", True, "randaugment", "top1"),
}


def test_presets_are_not_discovered_or_scheduled():
    names = {c.experiment for c in discover_configs()}
    assert "demo" in names and not any(n.startswith("paper_") for n in names)
    assert sorted(p.stem for p in PAPERS.glob("*.yaml")) == sorted(PAPER)


def test_resolution_order_entry_then_generation_then_paper():
    base = {"experiment": "x", "methods": {"dafusion": {}, "genie": {}, "real_guidance": {}, "diff_ii": {}}}
    c = parse_config(base)
    assert (resolve_protocol(c, "dafusion").scheduler, resolve_protocol(c, "dafusion").steps) == ("pndm", 50)
    assert resolve_protocol(c, "genie").scheduler == "dpmsolver" and resolve_protocol(c, "diff_ii").steps == 25
    rg = resolve_protocol(c, "real_guidance")  # no paper sampler: the project default
    assert (rg.scheduler, rg.steps, rg.guidance_scale, rg.images_per_real) == ("ddim", 25, 7.5, 4)
    assert rg.sources["scheduler"] == "project"
    c = parse_config({**base, "generation": {"steps": 12, "guidance_scale": 3.0}})
    assert resolve_protocol(c, "dafusion").steps == 12 and resolve_protocol(c, "dafusion").scheduler == "pndm"
    assert resolve_protocol(c, "genie").sources["steps"] == "generation"
    c = parse_config({**base, "generation": {"scheduler": "euler", "steps": 12},
                      "methods": {"dafusion": {"scheduler": "ddim", "steps": 7, "resolution": 64}, "genie": {},
                                  "diff_ii": {"params": {"expansion_rate": 3}}}})
    d = resolve_protocol(c, "dafusion")
    assert (d.scheduler, d.steps, d.resolution) == ("ddim", 7, 64) and d.sources["steps"] == "methods.dafusion"
    assert resolve_protocol(c, "genie").scheduler == "euler"
    di = resolve_protocol(c, "diff_ii")
    assert di.images_per_real == 3 and di.sources["images_per_real"] == "methods.diff_ii.params.expansion_rate"
    # the legacy models.diffusion.scheduler is experiment-wide, below generation.scheduler
    c = parse_config({**base, "models": {"diffusion": {"scheduler": "dpmsolver"}}})
    assert resolve_protocol(c, "dafusion").scheduler == "dpmsolver"
    lines = protocol_lines(parse_config(base))
    assert any(line.startswith("genie: dpmsolver 50 steps") and "start genie" in line for line in lines)


@pytest.mark.parametrize("entry, where", [
    ({"genie": {"scheduler": "plms"}}, "methods.genie.scheduler"),
    ({"dafusion": {"steps": 0}}, "methods.dafusion.steps"),
    ({"dafusion": {"params": {"steps": 0}}}, "methods.dafusion.params.steps"),
    ({"genie": {"params": {"ratio": 0.0}}}, "methods.genie.params.ratio"),
    ({"genie": {"params": {"ratio": 1.2}}}, "methods.genie.params.ratio"),
    ({"genie_ada": {"params": {"ratios": [0.0, 0.5]}}}, "methods.genie_ada.params.ratios"),
    ({"sgid": {"resolution": 4}}, "methods.sgid.resolution"),
    ({"dafusion": {"steps": 10, "params": {"steps": 20}}}, "methods.dafusion.steps"),
    ({"diff_ii": {"images_per_real": 2, "params": {"expansion_rate": 3}}}, "methods.diff_ii.images_per_real"),
])
def test_bad_protocol_values_name_the_key_and_file(tmp_path, entry, where):
    p = tmp_path / "bad.yaml"
    p.write_text(yaml.safe_dump({"experiment": "x", "methods": entry}))
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert where in str(e.value) and str(p) in str(e.value), str(e.value)


def test_memo_identity_keeps_old_keys_and_adds_changed_protocol():
    u = SynthUnit(label="a", seed=1, mode="img2img", strength=0.5)
    old = u.identity()
    assert not {"scheduler", "start_rule", "resolution"} & set(old)  # DDIM / SDEdit / native: key as before
    for change in ({"scheduler": "pndm"}, {"start_rule": "genie"}, {"resolution": 64}):
        v = SynthUnit(label="a", seed=1, mode="img2img", strength=0.5, **change)
        assert v.identity() != old and set(change) <= set(v.identity())


def test_demo_runs_every_method_on_its_papers_sampler():
    cfg = load_config(DEFAULT_CONFIG_DIR / "demo.yaml")
    want = {"dafusion": "pndm", "diagen": "pndm", "diff_ii": "ddim", "genie": "dpmsolver", "genie_ada": "dpmsolver",
            "sgid": "pndm"}
    for name in cfg.enabled_methods():
        algo = cfg.method_algorithm(name)
        p = resolve_protocol(cfg, name)
        if algo in want:
            assert p.scheduler == want[algo] and p.sources["scheduler"] == f"paper:{algo}", name
        assert p.steps <= 20, name  # scaled down for 2 cores (stated in demo.yaml)
    assert "scaled" in Path(DEFAULT_CONFIG_DIR / "demo.yaml").read_text()
