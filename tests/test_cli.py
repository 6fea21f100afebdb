"""The CLI: one-line errors with exit code 2, and nothing written."""

from click.testing import CliRunner

from factedit.cli import main


def test_unknown_recipe_key_is_a_clear_error(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("world: {bogus: 1}\n")
    res = CliRunner().invoke(main, ["world", "train", "--recipe", str(bad), "--out", str(tmp_path / "out")])
    assert res.exit_code == 2
    assert "unknown key(s) bogus" in res.output and "allowed keys" in res.output
    assert not (tmp_path / "out").exists()


def test_wrong_type_is_a_clear_error(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: {steps: many}\n")
    res = CliRunner().invoke(main, ["world", "train", "--recipe", str(bad), "--out", str(tmp_path / "out")])
    assert res.exit_code == 2
    assert "train.steps" in res.output and "integer" in res.output


def test_non_empty_output_is_refused_and_kept(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    res = CliRunner().invoke(main, ["world", "train", "--out", str(out)])
    assert res.exit_code == 2
    assert "--overwrite" in res.output
    assert (out / "keep.txt").read_text() == "mine"


def test_world_eval_runs_on_the_demo_model():
    res = CliRunner().invoke(main, ["world", "eval", "--limit", "20", "--json"])
    assert res.exit_code == 0, res.output
    import json

    # the runner mixes stderr (transformers' loading bar) into the output; the JSON ends it
    rec = json.loads(res.output[res.output.rindex("{"):])
    assert rec["recall_train_templates"] >= 0.99 and rec["n_train_templates"] == 20 * 8 * 4
