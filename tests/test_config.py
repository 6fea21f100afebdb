"""The edit settings as data: groups, ranges, unknown keys, method checks, the old flat keys,
the shipped recipes, `recipe explain` and the generated configuration page. All fast."""

import dataclasses
import json
import warnings
from pathlib import Path

import pytest
from click.testing import CliRunner

from factedit.cli import main
from factedit.editing.config import (
    METHODS,
    EditConfig,
    check_options,
    explain,
    explain_rows,
    load_edit_config,
    with_method,
)
from factedit.editing.settings import GROUPS, flat_mapping, specs
from factedit.recipes import RecipeError, RecipeWarning, from_dict

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "recipes").glob("*.yaml"))


def read(section, **kw):
    return from_dict(EditConfig, section, where="r.yaml: edit", **kw)


def recipe(tmp_path, text: str) -> Path:
    path = tmp_path / "r.yaml"
    path.write_text(text)
    return path


def test_every_field_is_a_setting_with_valid_metadata():
    fields = {f.name for f in dataclasses.fields(EditConfig)}
    assert {s.name for s in specs(EditConfig)} == fields  # no field without a group, unit, help
    for s in specs(EditConfig):
        assert s.group in GROUPS and s.setting.help and "\n" not in s.setting.help, s.name
        assert s.setting.methods and set(s.setting.methods) <= set(METHODS), s.name
        assert s.setting.valid is None or s.setting.valid.holds(s.default), s.name  # defaults are valid
    assert len({s.path for s in specs(EditConfig)}) == len(fields)  # one key per setting
    experimental = {s.name for s in specs(EditConfig) if s.setting.experimental}
    assert experimental == {"mlp_site", "head_fallback", "head_position"}


def test_ranges_are_enforced_naming_the_key_the_range_and_the_file(tmp_path):
    with pytest.raises(RecipeError, match=r"^r.yaml: edit.fit.lr must be positive, got -1.0$"):
        read({"fit": {"lr": -1}})
    with pytest.raises(RecipeError, match=r"r.yaml: edit.site.extraction_threshold must be from 0 to 100, got 150"):
        read({"site": {"extraction_threshold": 150}})
    with pytest.raises(RecipeError, match=r"edit.sequence.nullspace_threshold must be above 0 and below 1"):
        read({"sequence": {"nullspace_threshold": 1.0}})
    with pytest.raises(RecipeError, match=r"edit.batch.layers must be each zero or more, got \[1, -2\]"):
        read({"batch": {"layers": [1, -2]}})
    with pytest.raises(RecipeError, match=r"edit.fit.kl_prompt must be a text holding \{\} for the subject"):
        read({"fit": {"kl_prompt": "is a"}})
    path = recipe(tmp_path, "edit:\n  keys:\n    prefix_tokens: []\n")
    with pytest.raises(RecipeError, match=rf"^{path}: edit.keys.prefix_tokens must be a non-empty list"):
        load_edit_config(path)
    with pytest.raises(RecipeError, match=r"edit.steps must be zero or more, got -1"):  # in Python: the attribute
        EditConfig(steps=-1)
    cfg = EditConfig()
    cfg.lora_lr = 0.0  # set after construction: caught before an edit runs
    with pytest.raises(RecipeError, match="edit.lora_lr must be positive"):
        cfg.validate()


def test_unknown_keys_and_sections_are_refused_with_the_closest_name(tmp_path):
    with pytest.raises(RecipeError, match=r"unknown section\(s\) edti \(did you mean edit\?\); allowed sections are "
                                          r"world, model, train, analysis, edit"):
        load_edit_config(recipe(tmp_path, "edti:\n  method: mlp\n"))
    with pytest.raises(RecipeError, match=r"r.yaml: edit: unknown key\(s\) batch_lamda \(did you mean "
                                          r"batch.lambda\?\), stpes \(did you mean fit.steps\?\); "
                                          r"allowed keys are method, seed, site"):
        read({"stpes": 5, "batch_lamda": 1.0})
    with pytest.raises(RecipeError, match=r"r.yaml: edit.fit: unknown key\(s\) ridge \(did you mean insert.ridge\?\); "
                                          r"allowed keys are steps, lr"):
        read({"fit": {"ridge": 0.1}})
    with pytest.raises(RecipeError, match=r"unknown key\(s\) sequense \(did you mean sequence\?\)"):
        read({"sequense": {"passes": 2}})
    with pytest.raises(RecipeError, match=r"edit.batch: expected a mapping of the batch settings"):
        read({"batch": 3})
    from factedit.analysis.circuit import load_locate_config

    with pytest.raises(RecipeError, match=r"analysis: unknown key\(s\) knockout_windw \(did you mean knockout_window"):
        load_locate_config(recipe(tmp_path, "analysis: {knockout_windw: 3}\n"))


def test_settings_that_do_nothing_for_the_method_are_refused(tmp_path):
    with pytest.raises(RecipeError, match=r"r.yaml: edit: setting\(s\) that do nothing for method lora: site.max_heads "
                                          r"\(acts in circuit, heads\)"):
        read({"method": "lora", "site": {"max_heads": 1}, "lora": {"rank": 8}})
    with pytest.raises(RecipeError, match=r"for method circuit \(the default; set method to choose\): lora.rank"):
        read({"lora": {"rank": 8}})
    with pytest.raises(RecipeError, match=r"for method ft: fit.steps .*; seed"):
        read({"method": "ft", "fit": {"steps": 3}, "seed": 1})
    path = recipe(tmp_path, "edit: {lora: {rank: 8}}\n")
    assert load_edit_config(path, method="lora").lora_rank == 8  # the command line's --method is the one checked
    with pytest.raises(RecipeError, match=r"for method mlp \(--method\): site.lookup_position"):
        load_edit_config(recipe(tmp_path, "edit: {site: {lookup_position: subject}}\n"), method="mlp")
    with pytest.raises(RecipeError, match=r"option\(s\) that do nothing for method ft: --fit-cache .*; --seed"):
        check_options("ft", ["--fit-cache", "--stats-corpus", "--seed"])
    check_options("lora", ["--stats-corpus", "--seed"])
    model_recipe = EditConfig(mlp_layers=[3], batch_lambda=50.0, lookup_position="subject")
    with pytest.warns(RecipeWarning, match=r"method lora: the recipe's site.lookup_position, batch.lambda do nothing"):
        cfg = with_method(model_recipe, "lora")
    assert cfg.method == "lora" and cfg.mlp_layers == [3]  # mlp_layers act in lora: not named


def test_flat_keys_are_read_through_the_mapping_with_a_warning():
    grouped = {"method": "mlp", "site": {"mlp_layers": [3]}, "fit": {"steps": 5, "memory_gib": 2.0},
               "batch": {"lambda": 50.0, "insert_keys": "contexts"}, "sequence": {"strategy": "refit"}}
    flat = {"method": "mlp", "mlp_layers": [3], "steps": 5, "fit_memory_gib": 2.0, "batch_lambda": 50.0,
            "batch_insert_keys": "contexts", "sequential_strategy": "refit"}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        new = read(grouped)
    with pytest.warns(RecipeWarning, match=r"old flat key\(s\) .*steps -> fit.steps, fit_memory_gib -> "
                                           r"fit.memory_gib, batch_lambda -> batch.lambda"):
        old = read(flat)
    assert old == new == EditConfig(**flat)
    assert flat_mapping(EditConfig)["sequential_reassert_window"] == "sequence.reassert_window"
    assert "method" not in flat_mapping(EditConfig)  # the same in both forms
    with pytest.raises(RecipeError, match=r"r.yaml: edit: fit.steps and steps set the same setting \(fit.steps\)"):
        read({"fit": {"steps": 3}, "steps": 4})
    with pytest.warns(RecipeWarning), pytest.raises(RecipeError, match=r"edit.steps: expected an integer"):
        read({"steps": "five"})  # a flat key's error names it as written


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_shipped_recipes_are_grouped_and_load_as_before(path):
    """Each shipped recipe, rewritten into groups, loads (with no warning) to exactly the
    EditConfig its flat form gave (tests/data/shipped_edit_configs.json, written from it)."""
    before = json.loads((ROOT / "tests" / "data" / "shipped_edit_configs.json").read_text())[path.name]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cfg = load_edit_config(path)
    assert json.loads(json.dumps(dataclasses.asdict(cfg))) == before


def test_the_demo_checkpoint_carries_the_grouped_recipe():
    before = json.loads((ROOT / "tests" / "data" / "shipped_edit_configs.json").read_text())["demo-world.yaml"]
    section = json.loads((ROOT / "checkpoints" / "demo-world" / "world.json").read_text())["meta"]["recipe"]["edit"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cfg = read(section)
    assert json.loads(json.dumps(dataclasses.asdict(cfg))) == before


def test_explain_covers_every_setting(tmp_path):
    rows = explain_rows()
    assert [r["attribute"] for r in rows] == [s.name for s in specs(EditConfig)]
    assert len(rows) == len(dataclasses.fields(EditConfig))
    text = explain()
    for r in rows:
        assert f"  {r['key']} (" in text and r["help"] in text
    assert text.count("EXPERIMENTAL") == 3
    for group in GROUPS:
        assert f"{group}: " in text
    cfg = load_edit_config(ROOT / "recipes" / "smollm2-135m.yaml")
    batch = explain(cfg, group="batch")
    assert "batch.lambda (float, weight of C, positive)" in batch and "default 15000.0; recipe 50.0;" in batch
    assert "default spread; recipe: the default;" in batch
    assert "site." not in batch
    with pytest.raises(RecipeError, match=r"unknown settings group 'bath' \(did you mean batch\?\)"):
        explain_rows(group="bath")


def test_recipe_explain_command(tmp_path):
    res = CliRunner().invoke(main, ["recipe", "explain", "--group", "lora"])
    assert res.exit_code == 0, res.output
    assert "lora.rank (int, rank, at least 1)" in res.output and "fit." not in res.output
    flat = recipe(tmp_path, "edit: {batch_lambda: 40.0}\n")
    res = CliRunner().invoke(main, ["recipe", "explain", "--recipe", str(flat), "--group", "batch", "--json"])
    assert res.exit_code == 0, res.output
    row = next(r for r in json.loads(res.stdout) if r["key"] == "batch.lambda")
    assert row["value"] == "40.0" and row["default"] == "15000.0"
    assert "warning: " in res.stderr and "batch_lambda -> batch.lambda" in res.stderr
    res = CliRunner().invoke(main, ["recipe", "explain", "--recipe", str(recipe(tmp_path, "edit: {fti: {}}\n"))])
    assert res.exit_code == 2 and "did you mean ft" in res.output


def test_edit_refuses_options_the_method_does_not_use(tmp_path):
    """Refused before any model is loaded, and nothing is written."""
    args = ["edit", "--prompt", "{} was born in", "--subject", "Roric Dunnford", "--target-new", "Paris",
            "--out", str(tmp_path / "out")]
    res = CliRunner().invoke(main, [*args, "--method", "lora", "--fit-cache", str(tmp_path / "fc")])
    assert res.exit_code == 2 and "do nothing for method lora: --fit-cache" in res.output, res.output
    path = recipe(tmp_path, "edit: {method: ft, ft: {steps: 3}}\n")
    res = CliRunner().invoke(main, [*args, "--recipe", str(path), "--mode", "sequential"])
    assert res.exit_code == 2 and "do nothing for method ft: --mode sequential" in res.output, res.output
    assert not (tmp_path / "out").exists()


def test_the_configuration_page_is_not_stale():
    from factedit.editing.config_doc import REGENERATE, page

    committed = (ROOT / "docs" / "configuration.md").read_text()
    assert committed == page(), f"docs/configuration.md is stale: regenerate it with `{REGENERATE}`"


def test_world_train_checks_the_edit_section_before_training(tmp_path):
    bad = recipe(tmp_path, "edit: {fit: {stpes: 5}}\n")
    res = CliRunner().invoke(main, ["world", "train", "--recipe", str(bad), "--out", str(tmp_path / "out")])
    assert res.exit_code == 2 and "edit.fit: unknown key(s) stpes (did you mean fit.steps?)" in res.output
    assert not (tmp_path / "out").exists()
