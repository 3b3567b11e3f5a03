import pytest
import yaml

from augment_dagster.config import ConfigError, discover_configs, load_config, parse_config, parse_split_key, split_key


def write(tmp_path, data, name="exp.yaml"):
    p = tmp_path / name
    p.write_text(yaml.safe_dump(data))
    return p


def test_shipped_configs_validate():
    cfgs = {c.experiment: c for c in discover_configs()}
    assert "demo" in cfgs and "sd15_example" in cfgs
    assert cfgs["demo"].splits.keys() == ["2shot-s0", "2shot-s1", "4shot-s0", "4shot-s1"]
    assert cfgs["sd15_example"].models.llm.provider == "openai"


def test_unknown_key_names_key_and_file(tmp_path):
    p = write(tmp_path, {"experiment": "x", "generation": {"images_per_reel": 3}})
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert "generation.images_per_reel" in str(e.value) and str(p) in str(e.value) and "unknown key" in str(e.value)


@pytest.mark.parametrize("bad, where", [
    ({"generation": {"images_per_real": -1}}, "generation.images_per_real"),
    ({"generation": {"steps": "many"}}, "generation.steps"),
    ({"splits": {"shots": [0]}}, "splits.shots"),
    ({"methods": {"real_guidance": {"params": {"strength": 1.5}}}}, "methods.real_guidance.params.strength"),
    ({"methods": {"dafusion": {"params": {"strengths": [0.5, 2.0]}}}}, "methods.dafusion"),
    ({"methods": {"nosuch": {}}}, "unknown method 'nosuch'"),
    ({"methods": {"v1": {"method": "dafusion", "params": {"bogus": 1}}}}, "methods.v1.params.bogus"),
    ({"training": {"synthetic_probability": 1.2}}, "training.synthetic_probability"),
])
def test_bad_values_rejected(tmp_path, bad, where):
    p = write(tmp_path, {"experiment": "x", **bad})
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert where in str(e.value), str(e.value)
    assert str(p) in str(e.value)


def test_variant_points_at_method_and_hash_per_section():
    a = parse_config({"experiment": "x", "methods": {"dafusion": {}, "fixed": {"method": "dafusion", "params": {"fixed_strength": 0.5}}}})
    b = parse_config({"experiment": "x", "methods": {"dafusion": {}, "fixed": {"method": "dafusion", "params": {"fixed_strength": 0.25}}}})
    assert a.method_algorithm("fixed") == "dafusion"
    assert a.section_hash("methods", "dafusion") == b.section_hash("methods", "dafusion")
    assert a.section_hash("methods", "fixed") != b.section_hash("methods", "fixed")
    assert a.config_hash() != b.config_hash()


def test_split_keys_roundtrip():
    assert parse_split_key(split_key(4, 2)) == (4, 2)
    with pytest.raises(ValueError, match="bad split key"):
        parse_split_key("4-shot")


def test_not_yaml_mapping(tmp_path):
    p = tmp_path / "x.yaml"
    p.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(p)
