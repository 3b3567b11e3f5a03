"""Per-method generation protocols (methods/protocol.py): resolution order, errors, memo identity; the paper
presets are only discovered here (their values: tests/test_paper_presets.py)."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from augment_dagster.config import DEFAULT_CONFIG_DIR, ConfigError, discover_configs, load_config, parse_config
from augment_dagster.methods.base import SynthUnit
from augment_dagster.methods.protocol import NO_DIFFUSION, given
from augment_dagster.methods.registry import protocol_lines, resolve_protocol

PAPERS = DEFAULT_CONFIG_DIR / "papers"

# The presets' values are checked against the papers in tests/test_paper_presets.py (through `augment plan --json`).
PRESETS = ["dafusion", "diagen", "diff_ii", "genie", "sgid", "sgid_clip", "sgid_vit"]


def test_presets_are_not_discovered_or_scheduled():
    names = {c.experiment for c in discover_configs()}
    assert "demo" in names and not any(n.startswith("paper_") for n in names)
    assert sorted(p.stem for p in PAPERS.glob("*.yaml")) == PRESETS


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
    lines = protocol_lines(parse_config(base))
    assert any(line.startswith("genie: dpmsolver 50 steps") and "start genie" in line for line in lines)


@pytest.mark.parametrize("entry, where", [
    ({"genie": {"scheduler": "plms"}}, "methods.genie.scheduler"),
    ({"dafusion": {"steps": 0}}, "methods.dafusion.steps"),
    ({"dafusion": {"params": {"steps": 0}}}, "methods.dafusion.params.steps moved: set methods.dafusion.steps"),
    ({"genie": {"params": {"ratio": 0.0}}}, "methods.genie.params.ratio"),
    ({"genie": {"params": {"ratio": 1.2}}}, "methods.genie.params.ratio"),
    ({"genie_ada": {"params": {"ratios": [0.0, 0.5]}}}, "methods.genie_ada.params.ratios"),
    ({"sgid": {"resolution": 4}}, "methods.sgid.resolution"),
    ({"dafusion": {"params": {"guidance_scale": 3}}}, "set methods.dafusion.guidance_scale"),
    ({"diagen": {"params": {"images_per_real": 3}}}, "set methods.diagen.images_per_real"),
    ({"genie": {}}, None),
    ({"diff_ii": {"images_per_real": 2, "params": {"expansion_rate": 3}}}, "methods.diff_ii.images_per_real"),
])
def test_bad_protocol_values_name_the_key_and_file(tmp_path, entry, where):
    p = tmp_path / "bad.yaml"
    raw = {"experiment": "x", "methods": entry}
    if where is None:  # the older models.diffusion.scheduler names its new place
        raw["models"], where = {"diffusion": {"scheduler": "pndm"}}, "models.diffusion: Value error, scheduler moved: set generation.scheduler"
    p.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert where in str(e.value) and str(p) in str(e.value), str(e.value)
    assert len(str(e.value).splitlines()) <= 6


def test_memo_identity_keeps_old_keys_and_adds_changed_protocol():
    u = SynthUnit(label="a", seed=1, mode="img2img", strength=0.5, **given().unit_fields("img2img"))
    old = u.identity()
    assert not {"scheduler", "start_rule", "resolution"} & set(old)  # DDIM / SDEdit / native: key as before
    for change in ({"scheduler": "pndm"}, {"start_rule": "genie"}, {"resolution": 64}):
        v = SynthUnit(label="a", seed=1, mode="img2img", strength=0.5, **given(**change).unit_fields("img2img"))
        assert v.identity() != old and set(change) <= set(v.identity())
    # a transform unit records the values every unit had before the protocol existed: none enters its key
    t = SynthUnit(label="a", seed=1, mode="transform", **given(scheduler="pndm", steps=9).unit_fields("transform"))
    assert t.steps == NO_DIFFUSION["steps"] and not {"scheduler", "start_rule", "resolution", "preprocess",
                                                      "vae_encode"} & set(t.identity())
    with pytest.raises(TypeError, match="scheduler"):  # no protocol field has a default
        SynthUnit(label="a", seed=1, mode="img2img", guidance_scale=7.5, steps=25, start_rule="sdedit",
                  resolution=None, preprocess="resize", vae_encode="mode")


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
