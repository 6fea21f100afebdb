"""`factedit audit`: datasets, per-fact records, aggregates against a hand computation,
resumption after a torn write or a kill -9, and data parallelism (2 CPU processes)."""

import json
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from html import escape
from pathlib import Path

import pytest

from factedit.analysis.circuit import LocateConfig
from factedit.audit.compare import audit_differences
from factedit.audit.dataset import DatasetError, load_facts, world_facts
from factedit.audit.relations import NO_RELATION, WIKIDATA_RELATIONS, relation_name
from factedit.audit.report import FIGURES, HUB_MARKS
from factedit.audit.run import run_audit, world_related
from factedit.audit.store import FACTS, read_records
from factedit.audit.summary import robustness
from factedit.errors import FactEditError

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
LIMIT = 12  # entity-major: the first entity, three relations, four templates each


def _cfg():
    return LocateConfig(knockout_window=3, sublayer_window=1, attribute_top_k=10)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One thread, as an audit process runs (one process per core). The facts share clean passes
    by prompt length, so a resumed or extended audit computes a fact in another batch than an
    uninterrupted one: its records agree within the stated tolerance (factedit.audit.compare),
    bit for bit only where the CPU's kernels are batch-invariant."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def reference(one_thread, demo, tmp_path_factory):
    """An uninterrupted one-process audit of the first LIMIT world facts."""
    model, tok, world = demo
    out = tmp_path_factory.mktemp("audit") / "ref"
    facts = world_facts(world)[:LIMIT]
    summary = run_audit(facts, model=model, tokenizer=tok, out=out, config=_cfg(), dataset_name="world",
                        related_of=world_related(world, tok), progress=False, log=lambda m: None)
    return out, summary, facts


def test_outputs_and_records(reference):
    out, s, facts = reference
    for name in ("audit.json", FACTS, "summary.json", "report.html", "knockout_mean.png", "attribute_rate.png",
                 "extraction_rate.png", "knowledge_hubs.png", "enrichment_layers.png"):
        assert (out / name).is_file(), name
    recs = read_records(out / FACTS)
    assert [r["index"] for r in recs] == list(range(LIMIT))
    assert all(r["prompt"] == f.prompt and r["subject"] == f.subject for r, f in zip(recs, facts, strict=True))
    assert s["facts"] == LIMIT and s["known"] + s["unknown"] + s["errors"] == LIMIT
    assert s["known"] >= LIMIT - 1  # the demo model knows its world
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,") >= 5 and "src=\"http" not in html
    assert set(recs[0]["attribute_rate"]) == {"first_subject", "last_subject", "after_subject", "last"}


def test_summary_matches_a_hand_computation(reference):
    out, s, _ = reference
    known = [r for r in read_records(out / FACTS) if r["status"] == "known"]
    n = len(known)
    L = s["n_layers"]
    for src in ("subject", "non_subject", "last"):
        for la in range(L):
            xs = [r["knockout"][src][la] for r in known]
            m = sum(xs) / n
            sd = math.sqrt(sum((x - m) ** 2 for x in xs) / (n - 1))
            assert s["knockout"][src]["mean"][la] == pytest.approx(m, abs=1e-9)
            assert s["knockout"][src]["band95"][la] == pytest.approx(1.96 * sd / math.sqrt(n), abs=1e-9)
    for la in range(L):
        assert s["extraction_rate"]["attn"][la] == pytest.approx(
            sum(r["projection_rank"]["attn"][la] == 1 for r in known) / n)
    count = {}
    for r in known:
        for la, h, _p in r["extraction_heads"]:
            count[(la, h)] = count.get((la, h), 0) + 1
    if count:
        top = max(count.values())
        assert s["hubs"][0]["facts"] == top and count[(s["hubs"][0]["layer"], s["hubs"][0]["head"])] == top


def test_robustness_jaccard_by_hand():
    def rec(rel, group, heads):
        return {"relation": rel, "group": group, "extraction_heads": [[la, h, 0.5] for la, h in heads]}

    known = [rec("r", "a", [(1, 1), (2, 2)]), rec("r", "a", [(1, 1)]), rec("r", "a", []),
             rec("r", "b", []), rec("r", "b", []), rec("q", "c", [(0, 0)])]
    r = robustness(known)["r"]
    # group a: pairs {11,22}-{11} = 1/2, {11,22}-{} = 0, {11}-{} = 0; group b: one both-empty pair
    assert r["groups"] == 2 and r["pairs"] == 3 and r["both_empty_pairs"] == 1
    assert r["mean_jaccard"] == pytest.approx(0.5 / 3)
    assert r["same_top_head_share"] == 0.0
    assert "q" not in robustness(known)  # a single prompt has nothing to compare


def test_unknown_facts_are_filtered_and_counted(demo, tmp_path):
    model, tok, world = demo
    ent = world.entities[0]
    rid, prompt, attr = world.prompts(ent)[0]
    wrong = next(a for a in world.relations[rid].attributes if a != attr)
    data = tmp_path / "facts.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in [
        {"prompt": prompt, "subject": ent.name, "attribute": attr, "relation_id": rid},
        {"prompt": prompt, "subject": ent.name, "attribute": wrong, "relation_id": rid},
        {"prompt": "Nobody lives here", "subject": "Somebody", "attribute": attr, "relation_id": rid},
    ]) + "\n")
    s = run_audit(load_facts(data), model=model, tokenizer=tok, out=tmp_path / "o", config=_cfg(),
                  dataset_name=str(data), progress=False, log=lambda m: None)
    assert (s["known"], s["unknown"], s["errors"]) == (1, 1, 1)
    recs = read_records(tmp_path / "o" / FACTS)
    assert [r["status"] for r in recs] == ["known", "unknown", "error"]
    assert "Somebody" in recs[2]["error"]


def test_every_known_1000_relation_has_its_label():
    """Reports show known_1000's relation ids in words: the table covers every id of the file."""
    ids = {r["relation_id"] for r in json.loads((ROOT / "factedit" / "data" / "known_1000.json").read_text())}
    assert len(ids) >= 30 and ids <= set(WIKIDATA_RELATIONS), sorted(ids - set(WIKIDATA_RELATIONS))
    for rid in ids:
        assert relation_name(rid) == f"{rid} {WIKIDATA_RELATIONS[rid]}" and WIKIDATA_RELATIONS[rid].strip()
    assert relation_name("P176") == "P176 manufacturer" and relation_name("P17") == "P17 country"
    assert relation_name("city_country") == "city_country" and relation_name("") == NO_RELATION


def test_report_names_relations_and_says_why_a_cell_is_empty(demo, tmp_path):
    """A Wikidata relation appears with its label, records without a relation id under
    NO_RELATION, and a cell without a number says why (no known fact, one prompt per fact)."""
    model, tok, world = demo
    ent = world.entities[0]
    rid, prompt, attr = world.prompts(ent)[0]
    wrong = next(a for a in world.relations[rid].attributes if a != attr)
    data = tmp_path / "facts.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in [
        {"prompt": prompt, "subject": ent.name, "attribute": attr, "relation_id": "P19"},
        {"prompt": prompt, "subject": ent.name, "attribute": attr},
        {"prompt": prompt, "subject": ent.name, "attribute": wrong, "relation_id": "P176"},
    ]) + "\n")
    run_audit(load_facts(data), model=model, tokenizer=tok, out=tmp_path / "o", config=_cfg(),
              dataset_name=str(data), progress=False, log=lambda m: None)
    html = (tmp_path / "o" / "report.html").read_text()
    table = html[html.index("<h2>Per relation</h2>"):]
    for text in ("P19 place of birth", "P176 manufacturer", NO_RELATION, "no known fact",
                 "no fact with two known prompts"):
        assert text in table, text
    assert "n/a" not in table and "(none)" not in table


# What each audit figure draws, which its caption must name: axes, colours, bands and marks.
FIGURE_MARKS = {
    "knockout_mean.png": ("x:", "y:", "blue", "orange", "green", "shaded bands", "95%", "grey line"),
    "attribute_rate.png": ("x:", "y:", "legend", "marker"),
    "extraction_rate.png": ("x:", "y:", "purple", "red"),
    "knowledge_hubs.png": ("x: head", "y: layer", "colour", "dark purple", "yellow", f"red boxes: the {HUB_MARKS}"),
    "enrichment_layers.png": ("rows: relations", "x: mlp layer", "colour", "black", "yellow"),
    "robustness.png": ("(x)", "y:", "blue bars", "orange bars"),
}


def test_every_figure_caption_names_its_axes_and_marks(reference):
    out, _s, _facts = reference
    assert set(FIGURE_MARKS) == set(FIGURES)
    for name, words in FIGURE_MARKS.items():
        missing = [w for w in words if w not in FIGURES[name].lower()]
        assert not missing, (name, missing)
    html = (out / "report.html").read_text()
    for name in FIGURES:
        if (out / name).is_file():
            assert escape(FIGURES[name]) in html, name


def test_known_facts_and_counterfact_formats(tmp_path):
    known = [{"known_id": 7, "subject": "Beats Music", "attribute": "Apple", "template": "{} is owned by",
              "prediction": " Apple", "prompt": "Beats Music is owned by", "relation_id": "P127"}]
    (tmp_path / "k.json").write_text(json.dumps(known))
    f = load_facts(tmp_path / "k.json")[0]
    assert (f.prompt, f.subject, f.attribute, f.relation, f.source_id) == (
        "Beats Music is owned by", "Beats Music", "Apple", "P127", "7")
    cf = [{"case_id": 3, "requested_rewrite": {"prompt": "{}, that was created by", "subject": "Windows",
                                               "target_new": {"str": "Apple"}, "target_true": {"str": "Microsoft"},
                                               "relation_id": "P178"},
           "paraphrase_prompts": ["Noise. Windows is a product of", "No subject here"]}]
    (tmp_path / "cf.json").write_text(json.dumps(cf))
    facts = load_facts(tmp_path / "cf.json")
    assert [x.prompt for x in facts] == ["Windows, that was created by", "Noise. Windows is a product of"]
    assert {x.group for x in facts} == {"3"} and facts[0].attribute == "Microsoft"


@pytest.mark.parametrize("text,msg", [
    ("[{\"subject\": \"A\", \"attribute\": \"B\"}]", "record 0 has no 'prompt' or 'template'"),
    ("[{\"prompt\": \"{} x\", \"attribute\": \"B\"}]", "record 0 has no 'subject'"),
    ("[{\"template\": \"Q x\", \"subject\": \"A\", \"attribute\": \"B\"}]", "neither '{}' nor the subject"),
    ("{not json", "not valid JSON"),
    ("[]", "non-empty list"),
])
def test_bad_datasets_name_record_and_field(tmp_path, text, msg):
    p = tmp_path / "d.json"
    p.write_text(text)
    with pytest.raises(DatasetError, match=msg.replace("{", "\\{").replace("}", "\\}")):
        load_facts(p)


def test_torn_last_line_is_recomputed_and_nothing_doubled(demo, reference, tmp_path):
    model, tok, world = demo
    ref_out, _, facts = reference
    out = tmp_path / "resume"
    shutil.copytree(ref_out, out)
    lines = (out / FACTS).read_bytes().split(b"\n")
    (out / FACTS).write_bytes(b"\n".join(lines[:4]) + b"\n" + lines[4][: len(lines[4]) // 2])  # 4 facts + a torn one
    run_audit(facts, model=model, tokenizer=tok, out=out, config=_cfg(), dataset_name="world",
              related_of=world_related(world, tok), progress=False, log=lambda m: None)
    assert not audit_differences(out, ref_out)


@pytest.mark.slow
def test_a_larger_limit_extends_the_audit(demo, reference, tmp_path):
    model, tok, world = demo
    ref_out, _, facts = reference
    out = tmp_path / "grow"
    kw = dict(model=model, tokenizer=tok, out=out, config=_cfg(), dataset_name="world",
              related_of=world_related(world, tok), progress=False, log=lambda m: None)
    small = run_audit(facts[:5], **kw)
    assert small["facts"] == 5 and small["run"]["facts_this_run"] == 5
    full = run_audit(facts, **kw)
    assert full["facts"] == LIMIT and full["run"]["facts_this_run"] == LIMIT - 5  # the first 5 were kept
    assert not audit_differences(out, ref_out)
    again = run_audit(facts[:5], **kw)  # a smaller selection: summarised alone, nothing recomputed
    assert again["facts"] == 5 and again["run"]["facts_this_run"] == 0


# An audit extended from 5 to LIMIT facts in another process, under each of ATen's CPU kernel
# families this machine runs (the scalar one runs everywhere): the batches differ from the
# reference's, and so may the kernels' summation order; the records must agree within tolerance.
_EXTEND = """
import sys, torch
torch.set_num_threads(1)
from factedit.analysis.circuit import LocateConfig
from factedit.audit.dataset import world_facts
from factedit.audit.run import run_audit, world_related
from factedit.models.loading import load_model
from factedit.world.generate import World
print(torch.backends.cpu.get_cpu_capability(), file=sys.stderr)
model, tok = load_model()
world = World.load(model.name_or_path)
facts = world_facts(world)[:int(sys.argv[2])]
for n in (5, len(facts)):
    run_audit(facts[:n], model=model, tokenizer=tok, out=sys.argv[1], dataset_name="world",
              config=LocateConfig(knockout_window=3, sublayer_window=1, attribute_top_k=10),
              related_of=world_related(world, tok), progress=False, log=lambda m: None)
"""


def _kernel_families() -> list[str]:
    import torch

    have = torch.backends.cpu.get_cpu_capability()  # what this CPU runs by default: AVX512, AVX2, ...
    return ["default", *(["avx2"] if have in ("AVX2", "AVX512") else []), *(["avx512"] if have == "AVX512" else [])]


@pytest.mark.slow  # a fresh interpreter per CPU kernel family
@pytest.mark.parametrize("kernels", _kernel_families())
def test_an_extended_audit_agrees_across_cpu_kernels(reference, tmp_path, kernels):
    ref_out = reference[0]
    out = tmp_path / kernels
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ATEN_CPU_CAPABILITY": kernels}
    r = subprocess.run([sys.executable, "-c", _EXTEND, str(out), str(LIMIT)], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert kernels.upper() in r.stderr  # the kernels asked for were the ones used
    assert not audit_differences(out, ref_out)


def test_resuming_with_other_settings_is_refused(demo, reference, tmp_path):
    model, tok, world = demo
    out = tmp_path / "other"
    shutil.copytree(reference[0], out)
    with pytest.raises(FactEditError, match="another config"):
        run_audit(reference[2], model=model, tokenizer=tok, out=out, config=LocateConfig(knockout_window=1),
                  dataset_name="world", progress=False, log=lambda m: None)


def _cli(*args, env=None, **kw):
    return subprocess.Popen([str(BIN / "factedit"), "audit", "--no-progress", *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kw)


@pytest.mark.slow
def test_kill_9_loses_nothing(tmp_path):
    """SIGKILL an audit at a few points (before any record, after 3, 9 and 14 records, the
    last one after a further random delay); each rerun resumes, and the final result equals
    an uninterrupted run."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    ref, out = tmp_path / "ref", tmp_path / "killed"
    p = _cli("--out", str(ref), "--limit", "20", env=env)
    assert p.wait(timeout=300) == 0, p.stderr.read().decode()
    seed = int(os.environ.get("FACTEDIT_KILL_SEED", random.randrange(10**6)))
    delay = random.Random(seed).uniform(0.0, 0.5)
    print(f"audit kill seed {seed} (FACTEDIT_KILL_SEED to replay): extra delay {delay:.3f} s")
    for wait_lines in (0, 3, 9, 14):
        p = _cli("--out", str(out), "--limit", "20", env=env)
        t0 = time.time()
        while time.time() - t0 < 120:
            n = (out / FACTS).read_bytes().count(b"\n") if (out / FACTS).is_file() else 0
            if (wait_lines == 0 and (out / "audit.json").is_file()) or (wait_lines and n >= wait_lines) \
                    or p.poll() is not None:
                break
            time.sleep(0.02)
        if wait_lines == 14:
            time.sleep(delay)  # a random point: mid-fact, mid-write, or while aggregating
        p.send_signal(signal.SIGKILL)
        p.wait()
    p = _cli("--out", str(out), "--limit", "20", env=env)
    assert p.wait(timeout=300) == 0, p.stderr.read().decode()
    assert not audit_differences(out, ref)
    assert json.loads((out / "summary.json").read_text())["facts"] == 20


@pytest.mark.slow
def test_two_processes_equal_one(tmp_path):
    """`accelerate launch` with 2 CPU processes (gloo) shards the facts and merges the shards;
    the records and the summary agree with one process's within the stated tolerance."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one, two = tmp_path / "one", tmp_path / "two"
    p = _cli("--out", str(one), "--limit", "10", env=env)
    assert p.wait(timeout=300) == 0, p.stderr.read().decode()
    cmd = [str(BIN / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "factedit", "audit", "--no-progress",
           "--out", str(two), "--limit", "10"]
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "on 2 processes" in r.stderr
    assert not audit_differences(two, one)  # records and summary (less its "run" block)
    assert not list(two.glob("facts.shard*"))
    assert json.loads((two / "summary.json").read_text())["run"]["processes"] == 2


@pytest.mark.slow
def test_processes_option_equals_one_process_and_fails_in_one_line(tmp_path):
    """`--processes 2` (factedit starts the processes itself) gives the records of one process
    within the stated tolerance; a mistake found before the start, and one every process finds
    after loading the model, are each one line `error: ...` and exit 2, with no traceback."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one, two = tmp_path / "one", tmp_path / "two"
    assert _cli("--out", str(one), "--limit", "8", env=env).wait(timeout=300) == 0
    p = _cli("--out", str(two), "--limit", "8", "--processes", "2", env=env)
    assert p.wait(timeout=300) == 0, p.stderr.read().decode()
    assert "on 2 processes" in p.stderr.read().decode()
    assert not audit_differences(two, one)
    assert json.loads((two / "summary.json").read_text())["run"]["processes"] == 2
    for bad in (["--dataset", str(tmp_path / "known_1000.json")], ["--window", "500"]):
        p = _cli("--out", str(tmp_path / "bad"), "--processes", "2", *bad, env=env)
        assert p.wait(timeout=300) == 2
        err = [ln for ln in p.stderr.read().decode().splitlines() if ln.strip() and "Loading weights" not in ln]
        assert len(err) == 1 and err[0].startswith("error: "), err


def test_processes_under_a_launcher_is_refused(tmp_path, monkeypatch):
    from click.testing import CliRunner

    from factedit.cli import main

    monkeypatch.setenv("WORLD_SIZE", "2")
    res = CliRunner().invoke(main, ["audit", "--out", str(tmp_path / "a"), "--processes", "2"])
    assert res.exit_code == 2 and "drop it under `accelerate launch`" in res.output


def _full_word_tokenizer(vocab_size: int):
    """A word-level tokenizer whose every id is a word, so a random model's prediction decodes."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["[UNK]", *"the capital of beats music is apple paris".split()]
    words += [f"w{i}" for i in range(len(words), vocab_size)]
    t = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    t.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=t, unk_token="[UNK]")


@pytest.mark.parametrize("family", ["gpt2", "gptj", "gpt_neox", "llama", "opt", "qwen2"])
def test_audit_runs_on_model_families(family, tmp_path):
    """The audit on tiny random models: a fact whose attribute is the model's own prediction is
    known and gets a full record; the same prompt with another attribute is not known."""
    import torch

    from factedit.audit.dataset import AuditFact

    from .families import tiny_model

    model = tiny_model(family, dtype=torch.float32)
    tok = _full_word_tokenizer(model.config.vocab_size)
    prompt = "the capital of beats music is"
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([tok(prompt)["input_ids"]])).logits[0, -1]
    logits[0] = float("-inf")  # never [UNK]
    attr = tok.decode([int(logits.argmax())])
    if int(model(input_ids=torch.tensor([tok(prompt)["input_ids"]])).logits[0, -1].argmax()) == 0:
        pytest.skip("the random model predicts [UNK] here")
    other = "apple" if attr != "apple" else "paris"
    facts = [AuditFact(0, prompt, "beats music", attr, "P1", "g", related="apple paris"),
             AuditFact(1, prompt, "beats music", other, "P1", "g")]
    s = run_audit(facts, model=model, tokenizer=tok, out=tmp_path / "a", config=LocateConfig(knockout_window=2),
                  dataset_name="tiny", related_of=lambda f: f.related and {tok.convert_tokens_to_ids(w)
                                                                             for w in f.related.split()},
                  progress=False, log=lambda m: None)
    recs = read_records(tmp_path / "a" / FACTS)
    assert [r["status"] for r in recs] == ["known", "unknown"]
    L = model.config.num_hidden_layers
    assert s["known"] == 1 and s["unknown"] == 1 and len(s["knockout"]["subject"]["mean"]) == L
    assert len(recs[0]["attribute_rate"]["last_subject"]) == L + 1
    assert recs[0]["prediction"].strip() == attr
    assert (tmp_path / "a" / "report.html").is_file()


def test_audit_tolerance_catches_what_it_should():
    """The comparison that the resume, extension and data-parallel tests use: float32 rounding
    passes, anything larger or any discrete change does not."""
    from factedit.audit.compare import PERCENT_ATOL, VALUE_ATOL, differences

    rec = {"status": "known", "prediction": " Paris", "prediction_prob": 0.5, "projection_rank": {"attn": 1},
           "knockout": {"subject": [-70.0, -0.01]}, "extraction_heads": [[5, 3, 0.25]]}

    def changed(path: list, value):
        import copy

        out = copy.deepcopy(rec)
        at = out
        for k in path[:-1]:
            at = at[k]
        at[path[-1]] = value
        return out

    assert not differences(rec, changed(["knockout", "subject", 1], -0.01 + 0.9 * PERCENT_ATOL))
    assert not differences(rec, changed(["prediction_prob"], 0.5 + 0.9 * VALUE_ATOL))
    assert differences(rec, changed(["knockout", "subject", 1], -0.01 + 2 * PERCENT_ATOL))
    assert differences(rec, changed(["prediction_prob"], 0.5 + 2 * VALUE_ATOL))
    assert differences(rec, changed(["extraction_heads", 0, 2], 0.25 + 2 * VALUE_ATOL))  # a score, not a percent
    for path, value in ((["status"], "unknown"), (["prediction"], " Rome"), (["projection_rank", "attn"], 2),
                        (["extraction_heads", 0, 1], 4), (["knockout", "subject"], [-70.0])):
        assert differences(rec, changed(path, value)), path
    assert not differences({"run": {"seconds": 1.0}, "facts": 3}, {"run": {"seconds": 9.0}, "facts": 3})
    assert differences({"run": {"seconds": 1.0}, "facts": 3}, {"run": {"seconds": 1.0}, "facts": 4})
