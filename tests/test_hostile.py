"""Hostile inputs, refused cleanly and by class (factedit/validate.py is the one layer that
every loader, the command line and the Python API go through).

Property tests (hypothesis) generate hostile variants of every file factedit reads: request
files, audit datasets, an edit's history (a sequence folder), circuit JSON, an adapter's
files and manifest, the caches (value fits, key statistics, sampled corpora) and a pulled
model's manifest. The contract: the Python API raises FactEditError, the command line exits 2
with one line `error: ...` naming the input; nothing is written and nothing is lost; a cache
is rebuilt (with a message) instead. Then: locks on in-place work (two processes, two
threads), Ctrl-C (exit 130), bounds of numeric options, cache locations, size limits found
before any model work, the Python API's argument checks, and verify judging an adapter's
target_modules exactly as peft resolves them.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from factedit.cli import main
from factedit.errors import FactEditError
from factedit.validate import MAX_TEXT_CHARS

from .test_reliability import tree_hash

FAST = settings(max_examples=15, deadline=None, suppress_health_check=list(HealthCheck))
FACT = ["--prompt", "{} was born in", "--subject", "Roric Dunnford"]
EDIT = [*FACT, "--target-new", "Paris"]
REQ = {"prompt": "{} was born in", "subject": "Roric Dunnford", "target_new": "Paris"}
BIG = "x" * (MAX_TEXT_CHARS + 1)


def invoke(args: list) -> object:
    return CliRunner().invoke(main, [str(a) for a in args])


def refused(res, *words: str, code: int = 2) -> str:
    """One line `error: ...`, the last of stderr, holding ``words``; exit ``code``; no traceback."""
    assert res.exit_code == code, res.output
    assert "Traceback" not in res.output and isinstance(res.exception, SystemExit)
    lines = res.stderr.strip().splitlines()
    errors = [ln for ln in lines if ln.startswith("error:")]
    assert len(errors) == 1 and lines[-1] == errors[0], res.stderr
    for w in words:
        assert w in errors[0], (w, errors[0])
    return errors[0]


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("FACTEDIT_CACHE", str(tmp_path_factory.getbasetemp() / "hostile-cache"))


@pytest.fixture
def no_model(monkeypatch):
    """Fail the test if a model is loaded: the input must be refused before any model work."""
    import factedit.models.loading as loading

    def never(*a, **k):
        raise AssertionError("a model was loaded before the input was checked")

    monkeypatch.setattr(loading, "load_model", never)


@pytest.fixture(scope="module")
def art(tmp_path_factory, demo):
    """A two-step sequence, a single edit's adapter and a circuit, on the demo model, built once."""
    from factedit.analysis.locate import locate
    from factedit.editing.api import edit
    from factedit.editing.config import EditConfig
    from factedit.editing.requests import EditRequest

    model, tok, _ = demo
    old = os.environ.get("FACTEDIT_CACHE")
    os.environ["FACTEDIT_CACHE"] = str(tmp_path_factory.getbasetemp() / "hostile-cache")
    root = tmp_path_factory.mktemp("hostile")
    fast = root / "fast.yaml"
    fast.write_text("edit: {stats_samples: 2000, n_prefixes: 2, steps: 5, lookup_position: last}\n")
    cfg = EditConfig(stats_samples=2000, n_prefixes=2, steps=5, lookup_position="last")
    try:
        reqs = [EditRequest(**REQ), EditRequest(**{**REQ, "prompt": "{} plays the", "target_new": "guitar"})]
        edit(reqs, model=model, tokenizer=tok, config=cfg, mode="sequential", out=root / "seq", progress=False)
        edit(reqs[0], model=model, tokenizer=tok, config=cfg, out=root / "adapter", progress=False)
        (root / "loc").mkdir()
        locate(REQ["prompt"], REQ["subject"], model=model, tokenizer=tok).save(root / "loc" / "circuit.json")
    finally:
        if old is None:
            os.environ.pop("FACTEDIT_CACHE")
        else:
            os.environ["FACTEDIT_CACHE"] = old
    return {"root": root, "fast": fast, "seq": root / "seq", "adapter": root / "adapter",
            "circuit": root / "loc" / "circuit.json"}


# ---- hostile JSON: a random node of a document replaced, a key dropped, or the file mangled ---------

def _nodes(obj, path=()):
    yield path
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _nodes(v, (*path, k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj[:4]):
            yield from _nodes(v, (*path, i))


HOSTILE_VALUES = st.one_of(
    st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=6), st.sampled_from(["\ud800", "{} and {}", "", "  ", "-1", BIG[:200]]),
    st.lists(st.integers(-3, 3), max_size=3), st.dictionaries(st.text(max_size=3), st.integers(), max_size=2))


@st.composite
def json_mutation(draw, doc):
    """(new text or bytes of the document, what was done)."""
    kind = draw(st.sampled_from(["replace", "replace", "drop", "truncate", "latin-1", "not-json"]))
    text = json.dumps(doc)
    if kind == "truncate":
        return text[: draw(st.integers(0, len(text) - 1))], kind
    if kind == "latin-1":
        return text.replace('"', '"\xe9', 1).encode("latin-1", "replace"), kind
    if kind == "not-json":
        return draw(st.sampled_from(["", "[", "{}", "[]", "null", '"x"', "1e999"])), kind
    paths = [p for p in _nodes(doc) if (kind == "replace" and p) or (kind == "drop" and p and isinstance(
        _get(doc, p[:-1]), dict))]
    path = draw(st.sampled_from(paths))
    new = json.loads(text)
    parent = _get(new, path[:-1])
    if kind == "drop":
        del parent[path[-1]]
    else:
        value = draw(HOSTILE_VALUES)
        if value == parent[path[-1]]:
            value = [value, "changed"]
        parent[path[-1]] = value
    return json.dumps(new), f"{kind} {'/'.join(map(str, path))}"


def _get(obj, path):
    for k in path:
        obj = obj[k]
    return obj


def _write(path: Path, data) -> None:
    path.write_bytes(data if isinstance(data, bytes) else data.encode("utf-8", "surrogatepass"))


# ---- request files (edit --requests; the Python API's load_requests) ------------------------------

HOSTILE_RECORDS = [
    {**REQ, "prompt": "{} was born in \ud800"},  # a lone surrogate (a JSON escape)
    {**REQ, "subject": "Ro\udcffric"},
    {**REQ, "target_new": BIG},  # too long
    {**REQ, "prompt": "{} " + BIG},
    {**REQ, "prompt": "{} and {} were born in"},
    {**REQ, "subject": "Ro{}ric", "prompt": "Ro{}ric was born in"},
    {**REQ, "neighborhood_prompts": ["Ada lives in", "Roric  Dunnford was born in"]},  # the edited fact itself
    {**REQ, "paraphrase_prompts": ["Ada was born in"]},  # a paraphrase about another subject
    {**REQ, "neighborhood_prompts": "Ada was born in"},
    {**REQ, "paraphrase_prompts": [None]},
    {**REQ, "case_id": [1]},
    {**REQ, "target_true": "Paris"},
    {**REQ, "target_new": {"str": 7}},
    {"requested_rewrite": {**REQ, "prompt": "{} x \udc80"}},
]


@FAST
@given(bad=st.sampled_from(HOSTILE_RECORDS), before=st.integers(0, 2), jsonl=st.booleans())
def test_hostile_request_files_are_refused_naming_file_and_record(tmp_path_factory, bad, before, jsonl):
    from factedit.editing.requests import load_requests

    tmp = tmp_path_factory.mktemp("req")
    records = [{**REQ, "target_new": f"T{i}"} for i in range(before)] + [bad]
    path = tmp / "r.json"
    _write(path, "\n".join(json.dumps(r) for r in records) if jsonl else json.dumps(records))
    with pytest.raises(FactEditError) as info:  # the API
        load_requests(path)
    msg = str(info.value)
    assert "\n" not in msg and str(path) in msg and f"record {before}" in msg, msg
    if jsonl and before:  # (one line alone is read as JSON)
        assert f"line {before + 1}" in msg, msg
    res = invoke(["edit", "--requests", path, "--out", tmp / "out"])  # the command line: the same message
    assert refused(res, str(path), f"record {before}") == f"error: {' '.join(msg.split())}"[:1000]
    assert not (tmp / "out").exists()


@FAST
@given(data=st.binary(max_size=40) | st.sampled_from([b"\xff\xfe[", b'[{"prompt": "\xe9"}]', b"\x00" * 8]))
def test_request_files_of_any_bytes_are_refused_or_read(tmp_path_factory, data):
    tmp = tmp_path_factory.mktemp("bytes")
    (tmp / "r.json").write_bytes(data)
    res = invoke(["edit", "--requests", tmp / "r.json", "--out", tmp / "out"])
    refused(res, "r.json")
    assert not (tmp / "out").exists()


# ---- audit datasets (audit --dataset, study --dataset) ------------------------------------------

HOSTILE_FACTS = [
    ({"template": "{} and {} were born in", "subject": "Ada", "attribute": "Paris"}, "more than one '{}'"),
    ({"prompt": "Ro{}ric was born in", "subject": "Ro{}ric", "attribute": "Paris"}, "contains '{}'"),
    ({"prompt": "{} was born in", "subject": "Ro\udc00ric", "attribute": "Paris"}, "lone surrogate"),
    ({"prompt": "{} was born in", "subject": "Ada", "attribute": "Pa\ud800"}, "lone surrogate"),
    ({"prompt": "{} " + BIG, "subject": "Ada", "attribute": "Paris"}, "characters long"),
    ({"prompt": "{} was born in", "subject": "Ada", "attribute": "Paris", "related": "\udfff"}, "surrogate"),
    ({"case_id": 3, "requested_rewrite": {"prompt": "{} and {} x", "subject": "Ada", "target_true": "P"}},
     "more than one '{}'"),
]


@FAST
@given(case=st.sampled_from(HOSTILE_FACTS), before=st.integers(0, 2), command=st.sampled_from(["audit", "study"]))
def test_hostile_datasets_are_refused_before_the_model_is_loaded(tmp_path_factory, no_model, case, before, command):
    bad, why = case
    tmp = tmp_path_factory.mktemp("ds")
    good = [{"prompt": "{} was born in", "subject": f"Ada{i}", "attribute": "Paris"} for i in range(before)]
    path = tmp / "facts.json"
    _write(path, json.dumps([*good, bad]))
    res = invoke([command, "--dataset", path, "--out", tmp / "out"])
    refused(res, f"--dataset {path}", f"{'record' if why.startswith('more than one') else 'fact'} {before}", why)
    assert not (tmp / "out").exists() or not any((tmp / "out").iterdir())


def _mutate(data, path: Path) -> str:
    """Change one file that factedit wrote (a JSON file's content, or a safetensors file's
    tensors) as ``data`` draws; returns what was changed, for the assertion message."""
    if path.suffix == ".json":
        new, what = data.draw(json_mutation(json.loads(path.read_text())))
        _write(path, new)
        return what
    path.write_bytes(data.draw(_tensor_mutation(path)))
    return "tensors"


# ---- an edit's history: a sequence folder continued (--append) or undone (--undo) ------------------

@FAST
@given(data=st.data(), target=st.sampled_from(["edits.json", "sequence.safetensors", "adapter_model.safetensors",
                                              "adapter_config.json"]))
def test_a_changed_history_is_refused_and_the_folder_kept(tmp_path_factory, art, data, target):
    tmp = tmp_path_factory.mktemp("hist")
    seq = Path(shutil.copytree(art["seq"], tmp / "seq"))
    path = seq / target
    what = _mutate(data, path)
    before = tree_hash(seq)
    res = invoke(["edit", "--undo", "1", "--out", seq])
    msg = refused(res)
    assert str(seq) in msg, (what, msg)  # names the folder (or a file in it)
    assert tree_hash(seq) == before  # nothing written, nothing lost
    assert sorted(p.name for p in tmp.iterdir()) == ["seq"]  # no staging folder, no lock file


def _tensor_mutation(path: Path):
    """A safetensors file's bytes changed: values scaled, a byte flipped, cut short, or a tensor added."""
    from safetensors.torch import load_file
    from safetensors.torch import save as to_bytes

    raw = path.read_bytes()

    @st.composite
    def mutate(draw):
        kind = draw(st.sampled_from(["scale", "flip", "cut", "extra"]))
        if kind == "cut":
            return raw[: draw(st.integers(0, len(raw) - 1))]
        if kind == "flip":
            i = draw(st.integers(len(raw) // 2, len(raw) - 1))
            return raw[:i] + bytes([raw[i] ^ 0xFF]) + raw[i + 1:]
        t = load_file(str(path))
        if kind == "scale":
            t = {k: v * 1e6 for k, v in t.items()}
        else:
            t[draw(st.sampled_from(["000000/keys/mlp/x/subject", "junk", "000009/delta/m/A"]))] = torch.zeros(2, 2)
        return to_bytes(t)

    return mutate()


def test_an_unhashed_history_is_read_with_a_warning(art, tmp_path):
    """A sequence from an older factedit (no hashes in edits.json): undone, with a warning."""
    seq = Path(shutil.copytree(art["seq"], tmp_path / "seq"))
    man = json.loads((seq / "edits.json").read_text())
    del man["integrity"]
    (seq / "edits.json").write_text(json.dumps(man))
    res = invoke(["edit", "--undo", "1", "--out", seq])
    assert res.exit_code == 0, res.output
    assert "records no content hashes" in res.stderr
    assert "integrity" in json.loads((seq / "edits.json").read_text())  # rewritten with them


# ---- circuit JSON (edit --circuit; RecallCircuit.load) --------------------------------------------

@FAST
@given(data=st.data())
def test_a_changed_circuit_is_refused(tmp_path_factory, art, no_model, data):
    from factedit.analysis.circuit import RecallCircuit

    tmp = tmp_path_factory.mktemp("circ")
    new, what = data.draw(json_mutation(json.loads(art["circuit"].read_text())))
    path = tmp / "circuit.json"
    _write(path, new)
    with pytest.raises(FactEditError) as info:
        RecallCircuit.load(path)
    assert str(path) in str(info.value), (what, str(info.value))
    res = invoke(["edit", *EDIT, "--circuit", path, "--out", tmp / "out"])  # refused before the model loads
    refused(res, "--circuit", str(path))
    assert not (tmp / "out").exists()


def test_an_unchanged_circuit_loads_and_one_without_hash_is_checked_for_form(art, tmp_path):
    from factedit.analysis.circuit import RecallCircuit

    c = RecallCircuit.load(art["circuit"])
    data = json.loads(art["circuit"].read_text())
    del data["sha256"]  # a circuit written by hand or by an older factedit: its form is still checked
    data["extraction_heads"] = [{"layer": "1", "head": 0, "score": 0.5, "rank": 1}]
    (tmp_path / "c.json").write_text(json.dumps(data))
    with pytest.raises(FactEditError, match=r"extraction_heads\[0\]\.layer must be an integer"):
        RecallCircuit.load(tmp_path / "c.json")
    assert c.subject == "Roric Dunnford"


# ---- an adapter's files and manifest (verify) ------------------------------------------------------

@FAST
@given(data=st.data(), target=st.sampled_from(["edits.json", "adapter_config.json", "adapter_model.safetensors"]))
def test_a_changed_adapter_is_refused_by_verify(tmp_path_factory, art, demo, data, target):
    from factedit.verify.run import verify

    model, tok, _ = demo
    tmp = tmp_path_factory.mktemp("ad")
    ad = Path(shutil.copytree(art["adapter"], tmp / "ad"))
    path = ad / target
    what = _mutate(data, path)
    with pytest.raises(FactEditError) as info:
        verify(model=model, tokenizer=tok, adapter=ad)
    assert str(ad) in str(info.value), (what, str(info.value))


def test_an_adapter_changed_by_1e6_is_refused_not_judged(art, tmp_path):
    from safetensors.torch import load_file, save_file

    ad = Path(shutil.copytree(art["adapter"], tmp_path / "ad"))
    t = load_file(str(ad / "adapter_model.safetensors"))
    save_file({k: v * 1e6 for k, v in t.items()}, str(ad / "adapter_model.safetensors"), metadata={"format": "pt"})
    res = invoke(["verify", "--adapter", ad, "--no-fluency", "--out", tmp_path / "v"])
    refused(res, "adapter_model.safetensors", "was changed since factedit wrote it")
    assert not (tmp_path / "v").exists()


# ---- caches: rebuilt, with a message, never trusted beyond their hash -------------------------------

def _fit_entry(root: Path):
    from factedit.editing.fit_cache import FitCache, FittedValues

    cache = FitCache(root, "fp", log=lambda m: None)
    g = torch.Generator().manual_seed(0)
    cache.save("k" * 64, FittedValues(torch.randn(2, 8, generator=g), None, [0.5, float("inf")], [3.0, 4.0]))
    return cache, cache.path("k" * 64)


@FAST
@given(data=st.data())
def test_a_changed_fit_cache_entry_is_fitted_again_with_a_message(tmp_path_factory, data):
    from safetensors import safe_open
    from safetensors.torch import load_file
    from safetensors.torch import save as to_bytes

    tmp = tmp_path_factory.mktemp("fit")
    cache, path = _fit_entry(tmp)
    good = cache.load("k" * 64, torch.device("cpu"))
    assert good is not None and good.nll == [0.5, float("inf")]
    kind = data.draw(st.sampled_from(["scale", "meta", "drop-hash", "cut", "flip", "garbage"]))
    raw = path.read_bytes()
    if kind in ("scale", "meta", "drop-hash"):
        t = load_file(str(path))
        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata())
        if kind == "scale":
            t = {k: v * 1e6 for k, v in t.items()}
        elif kind == "meta":
            meta[data.draw(st.sampled_from(["nll", "base_nll", "key"]))] = data.draw(
                st.sampled_from(['{"a": 1}', "[1.0, 2.0]", "x", "[null, null]"]))
        else:
            del meta["sha256"]  # an entry of an older factedit: unverified
        raw = to_bytes(t, metadata=meta)
    elif kind == "cut":
        raw = raw[: data.draw(st.integers(0, len(raw) - 1))]
    elif kind == "flip":
        i = data.draw(st.integers(len(raw) - 64, len(raw) - 1))
        raw = raw[:i] + bytes([raw[i] ^ 0x01]) + raw[i + 1:]
    else:
        raw = data.draw(st.binary(max_size=64))
    path.write_bytes(raw)
    said = []
    cache.log = said.append
    assert cache.load("k" * 64, torch.device("cpu")) is None  # fitted again (and the entry replaced)
    assert cache.rebuilt == 1 and len(said) == 1 and str(path) in said[0] and "fitting that chunk again" in said[0]


@FAST
@given(kind=st.sampled_from(["scale", "drop-hash", "cut", "flip"]))
def test_a_changed_statistics_entry_is_computed_again(tmp_path_factory, kind):
    from safetensors import SafetensorError
    from safetensors.torch import load_file, save_file

    from factedit.editing.stats import _read_cached
    from factedit.integrity import sha256_tensors

    path = tmp_path_factory.mktemp("stats") / "mlp0.safetensors"
    t = {"C": torch.eye(4)}
    save_file(t, str(path), metadata={"sha256": sha256_tensors(t)})
    assert torch.equal(_read_cached(path), torch.eye(4))
    if kind in ("scale", "drop-hash"):
        meta = {} if kind == "drop-hash" else {"sha256": sha256_tensors(t)}
        save_file({"C": load_file(str(path))["C"] * (1e6 if kind == "scale" else 1)}, str(path), metadata=meta)
    else:
        raw = path.read_bytes()
        path.write_bytes(raw[:-7] if kind == "cut" else raw[:-1] + bytes([raw[-1] ^ 0x10]))
    with pytest.raises((ValueError, SafetensorError, OSError, KeyError)):  # second_moments computes it again
        _read_cached(path)


def test_a_changed_sampled_corpus_is_sampled_again(demo, tmp_path, monkeypatch):
    import factedit.editing.corpora as corpora

    model, tok, _ = demo
    monkeypatch.setenv("FACTEDIT_CACHE", str(tmp_path))
    calls = []
    monkeypatch.setattr(corpora, "sample_texts", lambda m, t, n, *a, **k: calls.append(n) or [f"t{i}" for i in
                                                                                                range(n)])
    first = corpora.sampled_corpus(model, tok, "fp", 300)
    assert len(calls) == 1 and corpora.sampled_corpus(model, tok, "fp", 300).texts == first.texts and len(calls) == 1
    (path,) = (tmp_path / "corpora").glob("sampled-*.jsonl")
    path.write_text(path.read_text().replace('"t1"', '"changed"'))
    assert corpora.sampled_corpus(model, tok, "fp", 300).texts == first.texts and len(calls) == 2


# ---- a pulled model's folder: checked against its manifest; pulled again when it does not match -----

def _fake_pull(calls):
    from factedit.integrity import sha256_file
    from factedit.io import atomic_write_text, dumps_json
    from factedit.models import zoo

    def pull_(m, out, echo):
        calls.append(m.name)
        out.mkdir(parents=True, exist_ok=True)
        (out / "model.safetensors").write_bytes(b"w" * 100)
        (out / "config.json").write_text("{}")
        files = {p.name: {"size": p.stat().st_size, "sha256": sha256_file(p)} for p in out.iterdir()
                 if p.name != zoo.MANIFEST}
        atomic_write_text(out / zoo.MANIFEST, dumps_json({"name": m.name, "files": files}))
        return out

    return pull_


@pytest.mark.parametrize("change", ["truncate", "same-size", "manifest-without-hashes", "manifest-garbage",
                                    "missing-file"])
def test_a_changed_model_cache_is_pulled_again(change, tmp_path, monkeypatch):
    from factedit.models import zoo

    monkeypatch.setenv("FACTEDIT_CACHE", str(tmp_path))
    calls: list[str] = []
    monkeypatch.setattr(zoo, "_pull", _fake_pull(calls))
    out = zoo.pull("smollm2-135m")
    assert calls == ["smollm2-135m"] and zoo.pull("smollm2-135m", verify=True) == out and len(calls) == 1
    w = out / "model.safetensors"
    if change == "truncate":
        w.write_bytes(b"w" * 10)
    elif change == "same-size":
        w.write_bytes(b"v" * 100)
    elif change == "manifest-without-hashes":
        (out / zoo.MANIFEST).write_text(json.dumps({"name": "smollm2-135m"}))
    elif change == "manifest-garbage":
        (out / zoo.MANIFEST).write_text("[1, ")
    else:
        w.unlink()
    said: list[str] = []
    res = invoke(["models", "pull", "smollm2-135m"])  # the command checks every file's hash
    assert res.exit_code == 0, res.output
    assert len(calls) == 2 and "pulling it again" in res.stderr, res.stderr
    assert zoo.folder_problem(out, full=True) is None
    zoo.pull("smollm2-135m", echo=said.append)
    assert len(calls) == 2 and not said


def test_a_killed_pulls_staging_folder_is_removed_and_a_live_ones_kept(tmp_path, monkeypatch):
    from factedit.models import zoo

    monkeypatch.setenv("FACTEDIT_CACHE", str(tmp_path))
    monkeypatch.setattr(zoo, "_pull", _fake_pull([]))
    models = tmp_path / "models"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    stale = models / f".smollm2-135m.partial-{dead}-abc"
    live = models / f".smollm2-135m.partial-{os.getpid()}-def"
    for d in (stale, live):
        d.mkdir(parents=True)
        (d / "model.safetensors").write_bytes(b"half")
    zoo.pull("smollm2-135m")
    assert not stale.exists() and live.exists()


# ---- locks: in-place work on a sequence is never lost to a second process --------------------------

HOLD = """
import sys, time
from pathlib import Path
from filelock import FileLock  # the lock factedit.io.held_lock takes: .NAME.lock beside the folder
p = Path(sys.argv[1])
with FileLock(p.parent / f".{p.name}.lock", timeout=0):
    print("held", flush=True)
    time.sleep(60)
"""


@pytest.mark.parametrize("op", ["append", "undo"])
def test_a_second_process_on_a_locked_sequence_is_refused(art, tmp_path, op):
    seq = Path(shutil.copytree(art["seq"], tmp_path / "seq"))
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(seq)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        before = tree_hash(seq)
        args = (["edit", "--recipe", art["fast"], "--append", "--prompt", "{} lives in", "--subject",
                 "Roric Dunnford", "--target-new", "Rome", "--out", seq] if op == "append"
                else ["edit", "--undo", "1", "--out", seq])
        refused(invoke(args), "--out", str(seq), "another factedit process holds its lock")
        assert tree_hash(seq) == before
    finally:
        holder.kill()
        holder.wait()
    res = invoke(["edit", "--undo", "1", "--out", seq])  # the lock went with the process
    assert res.exit_code == 0, res.output


def test_two_threads_cannot_both_hold_a_folders_lock(tmp_path):
    from factedit.io import held_lock

    (tmp_path / "seq").mkdir()
    inside, results = threading.Event(), []

    def second():
        inside.wait(5)
        try:
            with held_lock(tmp_path / "seq", "--out"):
                results.append("acquired")
        except FactEditError as exc:
            results.append(str(exc))

    t = threading.Thread(target=second)
    t.start()
    with held_lock(tmp_path / "seq", "--out"):
        inside.set()
        t.join(5)
    assert len(results) == 1 and "another factedit process holds its lock" in results[0]
    with held_lock(tmp_path / "seq", "--out"):  # released: free again
        pass


# ---- Ctrl-C: exit 130, one line, nothing half-written --------------------------------------------

@pytest.mark.parametrize("where", ["save", "append"])
def test_ctrl_c_exits_130_and_leaves_nothing_half_written(art, tmp_path, monkeypatch, where):
    import factedit.editing.export as export

    real = export.commit_dir

    def interrupted(staged, out, **kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(export, "commit_dir", interrupted)
    if where == "save":
        out = tmp_path / "out"
        res = invoke(["edit", "--recipe", art["fast"], *EDIT, "--out", out])
        assert not out.exists()
    else:
        out = Path(shutil.copytree(art["seq"], tmp_path / "seq"))
        before = tree_hash(out)
        res = invoke(["edit", "--recipe", art["fast"], "--append", "--prompt", "{} lives in", "--subject",
                      "Roric Dunnford", "--target-new", "Rome", "--out", out])
        assert tree_hash(out) == before
    refused(res, "interrupted", code=130)
    assert not [p.name for p in tmp_path.iterdir() if ".partial-" in p.name]
    assert real is not interrupted


# ---- numeric options: finite, bounded, checked before any model work -------------------------------

NUMBERS = [
    (["trace", *FACT, "--noise", "inf"], "--noise"),
    (["trace", *FACT, "--noise", "nan"], "--noise"),
    (["trace", *FACT, "--noise", "-1"], "--noise"),
    (["trace", *FACT, "--samples", "2000000000"], "--samples"),
    (["trace", *FACT, "--samples", "0"], "--samples"),
    (["trace", *FACT, "--window", str(10**8)], "--window"),
    (["trace", *FACT, "--seed", str(2**70)], "--seed"),
    (["trace", *FACT, "--seed", "-5"], "--seed"),
    (["locate", *FACT, "--window", str(2**62)], "--window"),
    (["edit", *EDIT, "--seed", str(2**70), "--out", "o"], "--seed"),
    (["edit", "--undo", "0", "--out", "o"], "--undo"),
    (["edit", "--undo", str(2**40), "--out", "o"], "--undo"),
    (["audit", "--limit", str(2**70), "--out", "o"], "--limit"),
    (["audit", "--paraphrases", str(10**12), "--out", "o"], "--paraphrases"),
    (["study", "--description-tokens", str(10**9), "--out", "o"], "--description-tokens"),
    (["study", "--paraphrases", "-1", "--out", "o"], "--paraphrases"),
    (["world", "mechanism", "--facts", str(10**12)], "--facts"),
    (["world", "mechanism", "--window", "0"], "--window"),
    (["world", "eval", "--limit", str(2**70)], "--limit"),
    (["demo", "--facts", str(10**12), "--real-model", "none", "--out", "o"], "--facts"),
]


@pytest.mark.parametrize("args, option", NUMBERS, ids=[" ".join(a[:1] + a[-3:-1]) for a, _ in NUMBERS])
def test_numeric_options_are_bounded_before_any_model_work(args, option, no_model, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    refused(invoke(args), option, "at most")
    assert not (tmp_path / "o").exists()


# ---- cache locations ------------------------------------------------------------------------------

def test_a_fit_cache_never_goes_into_a_model_folder(tmp_path, no_model):
    from factedit.paths import demo_checkpoint

    model = Path(shutil.copytree(demo_checkpoint(), tmp_path / "model"))
    before = tree_hash(model)
    for cache in (model, model / "fits", model / "a" / "b"):
        res = invoke(["edit", *EDIT, "--model", model, "--fit-cache", cache, "--out", tmp_path / "out"])
        refused(res, "--fit-cache", "model folder")
    res = invoke(["edit", *EDIT, "--fit-cache", demo_checkpoint() / "fits", "--out", tmp_path / "out"])
    refused(res, "--fit-cache", "model folder")
    assert tree_hash(model) == before and not (tmp_path / "out").exists()


@pytest.mark.parametrize("value, words", [("", ["FACTEDIT_CACHE", "empty"]), (" ", ["FACTEDIT_CACHE", "empty"]),
                                          ("file", ["FACTEDIT_CACHE", "not a folder"]),
                                          ("model/cache", ["FACTEDIT_CACHE", "model folder"])])
def test_factedit_cache_is_checked(value, words, tmp_path, monkeypatch):
    from factedit.paths import demo_checkpoint

    (tmp_path / "file").write_text("x")
    shutil.copytree(demo_checkpoint(), tmp_path / "model")
    monkeypatch.setenv("FACTEDIT_CACHE", value if not value.strip() else str(tmp_path / value))
    before = tree_hash(tmp_path)
    refused(invoke(["models", "where", "smollm2-135m"]), *words)
    assert tree_hash(tmp_path) == before


# ---- text that is no UTF-8, and sizes: refused before any model work -------------------------------

TEXTS = [
    (["locate", "--prompt", "{} was born in \udcff", "--subject", "Roric Dunnford"], ["prompt", "lone surrogate"]),
    (["trace", "--prompt", "{} was born in", "--subject", "Ro\ud800ric"], ["subject", "lone surrogate"]),
    (["locate", *FACT, "--target", "Pa\udcffris"], ["target", "lone surrogate"]),
    (["edit", *FACT, "--target-new", "Pa\udcffris", "--out", "o"], ["'target_new'", "lone surrogate"]),
    (["locate", "--prompt", "{} " + "x" * 10 * 2**20, "--subject", "Roric Dunnford"], ["prompt", "characters"]),
    (["trace", "--prompt", "{} " + BIG, "--subject", "Roric Dunnford"], ["prompt", "characters"]),
    (["edit", "--prompt", "{} " + "x" * 10 * 2**20, "--subject", "Roric Dunnford", "--target-new", "P",
      "--out", "o"], ["'prompt'", "characters"]),
    (["locate", *FACT, "--related", BIG], ["--related", "characters"]),
    (["locate", "--prompt", "{} and {} were born in", "--subject", "Ada"], ["more than one '{}'"]),
    (["trace", "--prompt", "Ro{}ric was born in", "--subject", "Ro{}ric"], ["contains '{}'"]),
]


@pytest.mark.parametrize("args, words", TEXTS, ids=[str(i) for i in range(len(TEXTS))])
def test_bad_text_and_huge_text_are_refused_at_once(args, words, no_model, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    t0 = time.perf_counter()
    refused(invoke(args), *words)
    assert time.perf_counter() - t0 < 5 and not (tmp_path / "o").exists()


def test_files_that_are_no_utf8_or_too_large_are_refused_before_reading(tmp_path, no_model):
    (tmp_path / "rel.txt").write_bytes("caf\xe9".encode("latin-1"))
    refused(invoke(["locate", *FACT, "--related-file", tmp_path / "rel.txt"]), "--related-file", "not UTF-8")
    with open(tmp_path / "huge.json", "wb") as f:
        f.truncate(300 * 2**20)  # sparse: its size is refused before a byte is read
    t0 = time.perf_counter()
    refused(invoke(["edit", "--requests", tmp_path / "huge.json", "--out", tmp_path / "o"]), "huge.json", "larger")
    assert time.perf_counter() - t0 < 2


# ---- the Python API checks its arguments (FactEditError, the command line's messages) ---------------

def _api_cases(model, tok, adapter):
    import factedit

    r = factedit.EditRequest("{} was born in", "Ada", "Paris")
    return [
        ("locate prompt int", lambda: factedit.locate(123, "Ada", model=model, tokenizer=tok), "prompt"),
        ("locate subject list", lambda: factedit.locate("{} was born in", ["Ada"], model=model, tokenizer=tok),
         "subject"),
        ("locate target int", lambda: factedit.locate("{} x", "Ada", 5, model=model, tokenizer=tok), "target"),
        ("locate config dict", lambda: factedit.locate("{} x", "Ada", model=model, tokenizer=tok, config={}),
         "config"),
        ("locate config negative", lambda: factedit.locate("{} x", "Ada", model=model, tokenizer=tok,
                                                           config=factedit.LocateConfig(max_heads=-1)), "max_heads"),
        ("locate model int", lambda: factedit.locate("{} x", "Ada", model=5), "model"),
        ("locate no tokenizer", lambda: factedit.locate("{} x", "Ada", model=model), "tokenizer"),
        ("locate related int", lambda: factedit.locate("{} x", "Ada", model=model, tokenizer=tok, related=5),
         "related"),
        ("edit list of str", lambda: factedit.edit(["{} was born in"], model=model, tokenizer=tok), "requests"),
        ("edit dict", lambda: factedit.edit({"prompt": "x"}, model=model, tokenizer=tok), "requests"),
        ("edit empty", lambda: factedit.edit([], model=model, tokenizer=tok), "no edit requests"),
        ("edit mode", lambda: factedit.edit(r, model=model, tokenizer=tok, mode="fast"), "mode"),
        ("edit config dict", lambda: factedit.edit(r, model=model, tokenizer=tok, config={"steps": 2}), "config"),
        ("edit circuits str", lambda: factedit.edit(r, model=model, tokenizer=tok, circuits="x"), "circuits"),
        ("edit stats_corpus int", lambda: factedit.edit(r, model=model, tokenizer=tok, stats_corpus=5),
         "stats_corpus"),
        ("edit out int", lambda: factedit.edit(r, model=model, tokenizer=tok, out=5), "out"),
        ("request paraphrases str", lambda: factedit.EditRequest("{} x", "Ada", "P", paraphrase_prompts="Ada x"),
         "paraphrase_prompts"),
        ("request neighbour = the edit", lambda: factedit.EditRequest(
            "{} x", "Ada", "P", neighborhood_prompts=["Ada x"]), "the edited fact itself"),
        ("request surrogate", lambda: factedit.EditRequest("{} x \ud800", "Ada", "P"), "lone surrogate"),
        ("request huge", lambda: factedit.EditRequest("{} " + BIG, "Ada", "P"), "characters long"),
        ("request case_id list", lambda: factedit.EditRequest("{} x", "Ada", "P", case_id=[1]), "case_id"),
        ("verify requests int", lambda: factedit.verify(model=model, tokenizer=tok, adapter=adapter, requests=5),
         "requests"),
        ("verify requests list of str", lambda: factedit.verify(model=model, tokenizer=tok, adapter=adapter,
                                                                requests=["x"]), "requests"),
        ("verify options dict", lambda: factedit.verify(model=model, tokenizer=tok, adapter=adapter,
                                                        options={"fluency": False}), "options"),
        ("verify adapter int", lambda: factedit.verify(model=model, tokenizer=tok, adapter=5), "--adapter"),
        ("verify model path", lambda: factedit.verify(model="x", tokenizer=tok, adapter=adapter), "loaded"),
        ("load_model int", lambda: factedit.load_model(5), "model"),
        ("load_model dtype int", lambda: factedit.load_model(None, dtype=5), "dtype"),
        ("load_requests int", lambda: factedit.load_requests(5), "request file"),
    ]


def test_the_python_api_checks_its_arguments(demo, art):
    model, tok, _ = demo
    for name, call, word in _api_cases(model, tok, art["adapter"]):
        with pytest.raises(FactEditError) as info:
            call()
        assert word in str(info.value) and "\n" not in str(info.value), (name, str(info.value))


def test_trace_api_bounds_its_numbers(demo):
    from factedit.analysis.trace import trace

    model, tok, _ = demo
    for kw, word in ((dict(samples=10**9), "samples"), (dict(noise=float("inf")), "noise"),
                     (dict(window=0), "window"), (dict(seed=-1), "seed"), (dict(kinds=("x",)), "kinds")):
        with pytest.raises(FactEditError, match=word):
            trace("{} was born in", "Roric Dunnford", model=model, tokenizer=tok, **kw)


# ---- verify judges target_modules exactly as peft resolves them -------------------------------------

@pytest.mark.parametrize("targets", ["all-linear", None])
def test_verify_resolves_target_modules_as_peft_does(art, demo, tmp_path, targets):
    """An adapter from elsewhere (no edits.json) whose target_modules is peft's shorthand
    'all-linear' or absent (the family's default targets): verify's update is the one peft
    applies, logit for logit."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from factedit.editing.weights import applied
    from factedit.verify.run import load_adapter_delta

    model, tok, _ = demo
    ad = Path(shutil.copytree(art["adapter"], tmp_path / "ad"))
    (ad / "edits.json").unlink()
    cfg = json.loads((ad / "adapter_config.json").read_text())
    cfg["target_modules"] = targets
    (ad / "adapter_config.json").write_text(json.dumps(cfg))
    ids = tok("Roric Dunnford was born in", return_tensors="pt")["input_ids"]
    base = AutoModelForCausalLM.from_pretrained(model.name_or_path)
    with torch.no_grad():
        plain = base(input_ids=ids).logits
        peft_logits = PeftModel.from_pretrained(base, str(ad))(input_ids=ids).logits
        with applied(model, load_adapter_delta(ad, model)):
            ours = model(input_ids=ids).logits
    torch.testing.assert_close(ours, peft_logits, atol=1e-4, rtol=1e-4)
    assert (targets is None) == torch.allclose(plain, peft_logits)  # gpt2's default targets: c_attn only


def test_pull_warm_samples_the_statistics_corpus_the_first_edit_would(tmp_path, monkeypatch):
    """`models pull --warm`: the model's recipe's sample size and the model's fingerprint, the
    same call the first edit makes (here on the demo checkpoint, the sampler recorded)."""
    from factedit.editing import corpora
    from factedit.editing.api import edit_config_for_model
    from factedit.models import zoo
    from factedit.models.fingerprint import model_fingerprint
    from factedit.models.loading import load_model
    from factedit.paths import demo_checkpoint

    monkeypatch.setattr(zoo, "pull", lambda name, **kw: demo_checkpoint())
    calls = []

    def sampled(model, tok, fingerprint, tokens, log=None):
        calls.append((fingerprint, tokens))
        return corpora.Corpus("sampled-test", [])

    monkeypatch.setattr(corpora, "sampled_corpus", sampled)
    res = invoke(["models", "pull", "smollm2-135m", "--warm"])
    assert res.exit_code == 0, res.output
    model, _ = load_model(demo_checkpoint())
    assert calls == [(model_fingerprint(model), edit_config_for_model(model).stats_samples)]
    assert "statistics corpus ready: sampled-test" in res.stderr
    calls.clear()
    assert invoke(["models", "pull", "smollm2-135m"]).exit_code == 0 and calls == []
