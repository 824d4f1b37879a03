import dataclasses

import pytest

from bitquant.errors import RecipeError
from bitquant.recipe import PROJECTIONS, Recipe, bundled_recipes, load_recipe


def test_default_recipe_is_plain_absmean():
    r = load_recipe()
    assert r.sha256() == Recipe().sha256()  # the YAML reproduces the dataclass defaults exactly
    assert r.method == "absmean" and r.eps == 1e-5 and r.projections == PROJECTIONS and r.exclude == ()
    assert "absmean" in bundled_recipes()


def test_recipe_is_frozen_and_hash_stable():
    r = load_recipe("absmean")
    with pytest.raises(dataclasses.FrozenInstanceError):
        r.eps = 0.1
    assert r.sha256() == load_recipe("absmean").sha256()
    assert r.replace(exclude=("model.layers.0.*",)).sha256() != r.sha256()
    assert r.replace(description="other words").sha256() == r.sha256()


def test_is_target_matches_projections_and_patterns():
    r = Recipe(exclude=("model.layers.0.*", "*.down_proj"))
    assert r.is_target("model.layers.1.self_attn.q_proj")
    assert not r.is_target("model.layers.0.self_attn.q_proj")
    assert not r.is_target("model.layers.1.mlp.down_proj")
    assert not r.is_target("lm_head")
    assert not r.is_target("model.embed_tokens")


def test_middle_recipe_keeps_layers_10_and_11_only():
    r = load_recipe("absmean-middle")
    targets = [i for i in range(30) if r.is_target(f"model.layers.{i}.mlp.up_proj")]
    assert targets == [10, 11]


def write(tmp_path, text):
    p = tmp_path / "r.yaml"
    p.write_text(text)
    return p


def test_unknown_field_is_named(tmp_path):
    with pytest.raises(RecipeError, match="unknown field 'epz'"):
        load_recipe(write(tmp_path, "name: x\nschema: 1\nepz: 0.1\n"))


def test_wrong_type_is_named(tmp_path):
    with pytest.raises(RecipeError, match="field 'eps' must be a float"):
        load_recipe(write(tmp_path, "name: x\nschema: 1\neps: small\n"))
    with pytest.raises(RecipeError, match="field 'exclude' must be a list"):
        load_recipe(write(tmp_path, "name: x\nschema: 1\nexclude: model.layers.0.*\n"))


def test_bad_choices_and_versions(tmp_path):
    with pytest.raises(RecipeError, match="'method' is 'awq'"):
        load_recipe(write(tmp_path, "name: x\nschema: 1\nmethod: awq\n"))
    with pytest.raises(RecipeError, match="'target_bits_per_weight' must be between 2"):
        load_recipe(write(tmp_path, "name: x\nschema: 1\ntarget_bits_per_weight: 1.5\n"))
    with pytest.raises(RecipeError, match="'equalize' must be a bool"):
        load_recipe(write(tmp_path, "name: x\nschema: 1\nequalize: 1\n"))
    with pytest.raises(RecipeError, match="calib_context"):
        load_recipe(write(tmp_path, "name: x\nschema: 1\ncalib_tokens: 10\n"))
    with pytest.raises(RecipeError, match="schema 1"):
        load_recipe(write(tmp_path, "name: x\nschema: 9\n"))
    with pytest.raises(RecipeError, match="unknown projections"):
        load_recipe(write(tmp_path, "name: x\nschema: 1\nprojections: [c_attn]\n"))


def test_invalid_yaml_and_missing_files(tmp_path):
    with pytest.raises(RecipeError, match="not valid YAML at line"):
        load_recipe(write(tmp_path, "name: [unclosed\n"))
    with pytest.raises(RecipeError, match="does not exist"):
        load_recipe(tmp_path / "nope.yaml")
    with pytest.raises(RecipeError, match="no bundled recipe named 'fancy'"):
        load_recipe("fancy")
    with pytest.raises(RecipeError, match="YAML mapping"):
        load_recipe(write(tmp_path, "- a\n- b\n"))


def test_example_nightly_recipe_loads():
    from conftest import REPO

    r = load_recipe(REPO / "examples" / "nightly-recipe.yaml")
    assert r.gates == {"max_ppl_ratio": 1.05, "max_kl": 0.05}


def test_calibrated_recipes_are_bundled():
    assert not load_recipe("absmean").calibrated
    gptq, mixed = load_recipe("gptq"), load_recipe("gptq-mixed")
    assert gptq.calibrated and gptq.method == "gptq" and gptq.target_bits_per_weight is None
    assert mixed.calibrated and mixed.target_bits_per_weight == 3.0
    assert load_recipe("absmean").replace(target_bits_per_weight=3).calibrated
