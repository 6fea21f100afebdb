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


FACT = ["--prompt", "{} was born in", "--subject", "Roric Dunnford"]


def test_locate_json_is_the_only_stdout():
    import json

    res = CliRunner().invoke(main, ["locate", *FACT, "--json"])
    assert res.exit_code == 0, res.output
    circuit = json.loads(res.stdout)  # stdout holds the JSON and nothing else
    assert circuit["prediction"].strip() == "Madrid" and circuit["subject_span"] == [0, 2]
    assert circuit["knockout"]["window"] == 3  # from the demo recipe


def test_locate_writes_circuit_and_figures(tmp_path):
    from factedit.analysis.circuit import RecallCircuit

    out = tmp_path / "loc"
    res = CliRunner().invoke(main, ["locate", *FACT, "--target", "Paris", "--window", "2", "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert "enrichment MLPs" in res.stdout and "knockout" in res.stdout
    c = RecallCircuit.load(out / "circuit.json")
    assert c.target.strip() == "Paris" and c.knockout.window == 2
    for name in ("knockout", "projection", "extraction_heads", "sublayer_knockout", "attribute_rate"):
        assert (out / f"{name}.png").stat().st_size > 5000
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary files left


def test_locate_bad_input_exits_2_and_writes_nothing(tmp_path):
    out = tmp_path / "loc"
    cases = [
        (["--prompt", "{} was born in", "--subject", ""], "subject is empty"),
        (["--prompt", "Ada was born in", "--subject", "Roric Dunnford"], "does not occur in the prompt"),
        ([*FACT, "--window", "9"], "larger than the model's 8 layers"),
        ([*FACT, "--target", " "], "target is empty"),
        ([*FACT, "--related", "x", "--related-file", "y"], "not both"),
    ]
    for args, msg in cases:
        res = CliRunner().invoke(main, ["locate", *args, "--out", str(out)])
        assert res.exit_code == 2, (args, res.output)
        assert msg in res.output and "Traceback" not in res.output
        assert not out.exists() or not any(out.iterdir())
    bad = tmp_path / "r.yaml"
    bad.write_text("analysis: {knockout_windw: 3}\n")
    res = CliRunner().invoke(main, ["locate", *FACT, "--recipe", str(bad)])
    assert res.exit_code == 2 and "knockout_windw" in res.output


def test_locate_warns_when_it_follows_a_function_word_or_an_unlikely_token():
    """A prompt that does not end where the attribute comes next: the demo model's prediction
    is then not an attribute, and locate says so on stderr with how to pass --target; the
    well-formed fact and a given --target are not flagged."""
    import dataclasses

    from factedit.analysis.circuit import RecallCircuit
    from factedit.analysis.locate import locate

    res = CliRunner().invoke(main, ["locate", *FACT, "--window", "2"])
    assert res.exit_code == 0 and "warning" not in res.stderr, res.output
    c = locate(FACT[1], FACT[3], config=None)
    assert isinstance(c, RecallCircuit) and c.target_warning() is None
    flagged = dataclasses.replace(c, prediction=" the", prediction_prob=0.21)
    assert "' the' (p 0.21), a function word" in flagged.target_warning() and "--target" in flagged.target_warning()
    assert "below p 0.1" in dataclasses.replace(c, prediction_prob=0.05).target_warning()
    assert dataclasses.replace(flagged, target=" the").target_warning() is None  # asked for: followed as given
    res = CliRunner().invoke(main, ["locate", "--prompt", "{} was born in the city of", "--subject", FACT[3],
                                    "--window", "2"])
    assert res.exit_code == 0, res.output
    circuit_pred = locate("{} was born in the city of", FACT[3]).target_warning()
    assert ("warning: " in res.stderr) == (circuit_pred is not None)
