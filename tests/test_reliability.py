"""Reliability and security (issue 8).

- Bad input (one row per case): exit code 2, one line ``error: ...`` naming the problem and
  the fix, no traceback, the output folder absent or unchanged, the base model folder
  unchanged (hashed before and after).
- --overwrite keeps files that are not factedit's own; request fields never become paths.
- Exactness: merged weights and restored weights bit for bit; same seed, same bytes.
- Security defaults: safetensors only, no remote code, no unsafe loaders in the package.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import shutil
from pathlib import Path

import pytest
import torch
import transformers as tf
from click.testing import CliRunner
from tokenizers import Tokenizer, models, pre_tokenizers

from factedit.cli import main
from factedit.paths import demo_checkpoint

DEMO = demo_checkpoint()
FACT = ["--prompt", "{} was born in", "--subject", "Roric Dunnford"]
EDIT = [*FACT, "--target-new", "Paris"]
PACKAGE = Path(__file__).resolve().parents[1] / "factedit"


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("FACTEDIT_CACHE", str(tmp_path_factory.getbasetemp() / "stats-cache"))


def tree_hash(folder: Path) -> str:
    """Every file's relative path and bytes, and every folder's name."""
    h = hashlib.sha256()
    for p in sorted(Path(folder).rglob("*")):
        h.update(str(p.relative_to(folder)).encode())
        if p.is_file():
            h.update(hashlib.sha256(p.read_bytes()).digest())
    return h.hexdigest()


def invoke(args: list[str]):
    return CliRunner().invoke(main, args)


# ---- model folders and artefacts from elsewhere -----------------------------------------------

def _copy_demo(root: Path, name: str) -> Path:
    return Path(shutil.copytree(DEMO, root / name))


def _save(model, tok, folder: Path) -> Path:
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def _dropping_tokenizer():
    """A BPE without an unknown token: characters outside its alphabet tokenize to nothing."""
    chars = list("abcdefghijklmnopqrstuvwxyzADR.")
    t = Tokenizer(models.BPE({c: i for i, c in enumerate(["<eos>", *chars])}, [], unk_token=None))
    t.pre_tokenizer = pre_tokenizers.Whitespace()
    return tf.PreTrainedTokenizerFast(tokenizer_object=t, eos_token="<eos>")


@pytest.fixture(scope="module")
def art(tmp_path_factory):
    """Everything the bad-input table refers to, built once."""
    root = tmp_path_factory.mktemp("art")
    demo_tok = tf.AutoTokenizer.from_pretrained(DEMO)
    a = {"root": root}
    (root / "fast.yaml").write_text("edit: {stats: {samples: 2000}, keys: {n_prefixes: 2}, fit: {steps: 5}, "
                                    "site: {lookup_position: last}}\n")
    (root / "corpus.txt").write_text("ada was born in rome. bob was born in oslo. " * 40)

    torch.manual_seed(0)
    tiny = tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=len(demo_tok), n_layer=2, n_head=2, n_embd=16,
                                            n_positions=64, bos_token_id=0, eos_token_id=0))
    a["tiny"] = _save(tiny, demo_tok, root / "tiny")  # another model, same tokenizer
    bloom = tf.BloomForCausalLM(tf.BloomConfig(vocab_size=len(demo_tok), hidden_size=16, n_layer=1, n_head=2))
    a["bloom"] = _save(bloom, demo_tok, root / "bloom")  # a family factedit does not support
    drop_tok = _dropping_tokenizer()
    drop = tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=len(drop_tok), n_layer=2, n_head=2, n_embd=16,
                                            n_positions=64, bos_token_id=0, eos_token_id=0))
    a["drop"] = _save(drop, drop_tok, root / "drop")

    a["unknown_type"] = _copy_demo(root, "unknown_type")
    cfg = json.loads((a["unknown_type"] / "config.json").read_text())
    (a["unknown_type"] / "config.json").write_text(json.dumps({**cfg, "model_type": "foobar"}))
    a["bad_config"] = _copy_demo(root, "bad_config")
    (a["bad_config"] / "config.json").write_text('{"model_type": "gpt2", ')
    a["no_tokenizer"] = _copy_demo(root, "no_tokenizer")
    (a["no_tokenizer"] / "tokenizer.json").unlink()
    a["truncated"] = _copy_demo(root, "truncated")
    w = a["truncated"] / "model.safetensors"
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
    a["garbage"] = _copy_demo(root, "garbage")
    (a["garbage"] / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not a header!!}" + b"\0" * 64)
    a["pickle"] = root / "pickle"
    _save(tiny, demo_tok, a["pickle"])
    (a["pickle"] / "model.safetensors").unlink()
    torch.save(tiny.state_dict(), a["pickle"] / "pytorch_model.bin")
    code = f"open({str(root / 'RAN')!r}, 'w').write('remote code ran')\nfrom transformers import GPT2Config as Config\n"
    auto_map = {"AutoConfig": "custom.Config", "AutoModelForCausalLM": "custom.Model"}
    a["remote"] = _copy_demo(root, "remote")  # a supported family that also brings code
    (a["remote"] / "config.json").write_text(json.dumps({**cfg, "auto_map": auto_map}))
    (a["remote"] / "custom.py").write_text(code)
    a["remote_only"] = _copy_demo(root, "remote_only")  # a model that exists only as its own code
    (a["remote_only"] / "config.json").write_text(json.dumps({**cfg, "model_type": "custom_lm", "auto_map": auto_map}))
    (a["remote_only"] / "custom.py").write_text(code)
    a["demo_copy"] = _copy_demo(root, "demo_copy")

    res = invoke(["locate", "--model", str(a["tiny"]), *FACT, "--out", str(root / "tiny_loc")])
    assert res.exit_code == 0, res.output
    a["foreign_circuit"] = root / "tiny_loc" / "circuit.json"
    res = invoke(["locate", *FACT, "--out", str(root / "loc")])
    assert res.exit_code == 0, res.output
    c = json.loads((root / "loc" / "circuit.json").read_text())
    c["extraction_heads"] = [{"layer": 7, "head": 8, "score": 0.5, "rank": 1, "ov_rank": None}]
    del c["sha256"]  # written by hand: no hash (a changed circuit with one is refused: test_hostile)
    (root / "head8.json").write_text(json.dumps(c))
    res = invoke(["edit", "--recipe", str(root / "fast.yaml"), *EDIT, "--out", str(root / "adapter")])
    assert res.exit_code == 0, res.output
    a["adapter"] = root / "adapter"

    req = {"prompt": "{} was born in", "subject": "Roric Dunnford", "target_new": "Paris"}
    (root / "invalid.json").write_text('[{"prompt": "{} was born in", "subject": "Roric Dunnford",')
    (root / "audit_missing.json").write_text(json.dumps([
        {"prompt": "{} was born in", "subject": "Roric Dunnford", "attribute": "Paris"},
        {"prompt": "{} was born in", "attribute": "Paris"}]))
    (root / "missing.json").write_text(json.dumps([req, {"prompt": "{} plays the", "subject": "Ada"}]))
    (root / "wrongtype.json").write_text(json.dumps([{**req, "case_id": 7, "subject": 42}]))
    (root / "twoholes.json").write_text(json.dumps([req, {**req, "prompt": "{} and {} were born in"}]))
    (root / "longtarget.json").write_text(json.dumps([req, {**req, "prompt": "and " * 41 + "{} was born in"}]))
    (root / "unknown.yaml").write_text("edit: {stpes: 5}\n")
    (root / "wrongtype.yaml").write_text("edit: {steps: five}\n")
    (root / "infinite.yaml").write_text("edit: {lr: .inf}\n")
    (root / "negative.yaml").write_text("edit: {max_heads: -1}\n")
    (root / "layer9.yaml").write_text("edit: {mlp_layers: [9]}\n")
    (root / "window.yaml").write_text("analysis: {knockout_window: 12}\n")
    return a


def _nan_rank_one(monkeypatch):
    """An update that comes out NaN, as a diverging fit or an ill-conditioned solve would give."""
    import factedit.editing.edit as edit_mod

    real = edit_mod.rank_one

    def rank_one(*args, **kw):
        b, a = real(*args, **kw)
        return b * float("nan"), a

    monkeypatch.setattr(edit_mod, "rank_one", rank_one)


# (id, arguments (A: the artefacts), words the message must hold, model folder that must stay unchanged)
CASES = [
    # prompts and targets
    ("subject-not-in-prompt", lambda A: ["edit", "--prompt", "Ada was born in", "--subject", "Roric Dunnford",
                                         "--target-new", "Paris"], ["does not occur", "template"], None),
    ("empty-prompt", lambda A: ["edit", "--prompt", "", "--subject", "Roric Dunnford", "--target-new", "Paris"],
     ["'prompt'", "non-empty"], None),
    ("empty-subject", lambda A: ["locate", "--prompt", "{} was born in", "--subject", " "],
     ["subject is empty"], None),
    ("prompt-longer-than-context", lambda A: ["edit", "--prompt", "and " * 200 + "{} was born in",
                                              "--subject", "Roric Dunnford", "--target-new", "Paris"],
     ["context of 128", "shorten"], None),
    ("prompt-plus-target-longer-than-context", lambda A: ["edit", "--requests", str(A["root"] / "longtarget.json")],
     ["request 1", "context of 128", "shorten"], None),
    ("target-tokenizes-to-nothing", lambda A: ["edit", "--model", str(A["drop"]), "--stats-corpus",
                                               str(A["root"] / "corpus.txt"), "--prompt", "{} was born in",
                                               "--subject", "ada", "--target-new", "€€"],
     ["request 0", "tokenizes to nothing"], "drop"),
    ("empty-target", lambda A: ["edit", *FACT, "--target-new", "  "], ["'target_new'", "non-empty"], None),
    ("multi-token-target-for-locate", lambda A: ["locate", *FACT, "--target", "Paris Madrid"],
     ["2 tokens", "one token", "first token"], None),
    ("multi-token-target-for-a-lookup-edit", lambda A: ["edit", "--recipe", str(A["root"] / "fast.yaml"), *FACT,
                                                        "--target-new", "Paris Madrid"],
     ["request 0", "2 tokens", "last position", "one-token target"], None),
    ("subject-ends-prompt", lambda A: ["edit", "--prompt", "I met {}", "--subject", "Roric Dunnford",
                                       "--target-new", "Paris"], ["relation must follow"], None),
    # models and weights
    ("unsupported-family", lambda A: ["edit", "--model", str(A["bloom"]), *EDIT],
     ["'bloom'", "not supported", "supported family"], "bloom"),
    ("family-unknown-to-transformers", lambda A: ["locate", "--model", str(A["unknown_type"]), *FACT],
     ["'foobar'", "not supported"], "unknown_type"),
    ("missing-model-folder", lambda A: ["edit", "--model", str(A["root"] / "nope"), *EDIT],
     ["does not exist", "check the path"], None),
    ("corrupt-config", lambda A: ["edit", "--model", str(A["bad_config"]), *EDIT],
     ["config.json", "not valid JSON"], "bad_config"),
    ("missing-tokenizer", lambda A: ["edit", "--model", str(A["no_tokenizer"]), *EDIT],
     ["could not load", "tokenizer files"], "no_tokenizer"),
    ("truncated-safetensors", lambda A: ["edit", "--model", str(A["truncated"]), *EDIT],
     ["model.safetensors", "truncated or corrupt", "re-download"], "truncated"),
    ("corrupt-safetensors", lambda A: ["locate", "--model", str(A["garbage"]), *FACT],
     ["model.safetensors", "truncated or corrupt"], "garbage"),
    ("pickle-without-opt-in", lambda A: ["edit", "--model", str(A["pickle"]), *EDIT],
     ["pickle", "--allow-pickle"], "pickle"),
    ("model-that-is-only-remote-code", lambda A: ["edit", "--model", str(A["remote_only"]), *EDIT],
     ["'custom_lm'", "not supported"], "remote_only"),
    # artefacts from elsewhere
    ("circuit-from-another-model", lambda A: ["edit", *EDIT, "--circuit", str(A["foreign_circuit"])],
     ["located on another model", "factedit locate"], None),
    ("adapter-from-another-base", lambda A: ["verify", "--model", str(A["tiny"]), "--adapter", str(A["adapter"])],
     ["another base model", "--model"], "tiny"),
    ("not-an-adapter", lambda A: ["verify", "--adapter", str(A["root"] / "loc")],
     ["not a PEFT adapter folder"], None),
    # request files
    ("request-file-invalid-json", lambda A: ["edit", "--requests", str(A["root"] / "invalid.json")],
     ["neither JSON nor JSONL", "line 1"], None),
    ("request-missing-field", lambda A: ["edit", "--requests", str(A["root"] / "missing.json")],
     ["record 1", "missing field 'target_new'"], None),
    ("request-wrong-type", lambda A: ["edit", "--requests", str(A["root"] / "wrongtype.json")],
     ["record 0 (case_id 7)", "'subject'", "string"], None),
    ("request-two-subject-holes", lambda A: ["edit", "--requests", str(A["root"] / "twoholes.json")],
     ["record 1", "'prompt'", "exactly one"], None),
    ("request-file-missing", lambda A: ["edit", "--requests", str(A["root"] / "nope.json")],
     ["does not exist"], None),
    # output folder
    ("output-not-empty", lambda A: ["edit", *EDIT], ["not empty", "--overwrite"], None),
    ("output-inside-model-folder", lambda A: ["edit", "--model", str(A["demo_copy"]), *EDIT],
     ["model folder", "outside"], "demo_copy"),
    # recipes and options
    ("recipe-unknown-key", lambda A: ["edit", "--recipe", str(A["root"] / "unknown.yaml"), *EDIT],
     ["unknown key(s) stpes", "allowed keys"], None),
    ("recipe-wrong-type", lambda A: ["edit", "--recipe", str(A["root"] / "wrongtype.yaml"), *EDIT],
     ["edit.steps", "expected an integer"], None),
    ("recipe-non-finite", lambda A: ["edit", "--recipe", str(A["root"] / "infinite.yaml"), *EDIT],
     ["edit.lr", "finite"], None),
    ("recipe-negative", lambda A: ["edit", "--recipe", str(A["root"] / "negative.yaml"), *EDIT],
     ["edit.max_heads", "zero or more"], None),
    ("recipe-layer-out-of-range", lambda A: ["edit", "--recipe", str(A["root"] / "layer9.yaml"), *EDIT],
     ["mlp_layers", "layers 0..7"], None),
    ("window-larger-than-layers", lambda A: ["locate", *FACT, "--window", "9"],
     ["larger than the model's 8 layers", "between 1 and 8"], None),
    ("recipe-window-larger-than-layers", lambda A: ["locate", *FACT, "--recipe", str(A["root"] / "window.yaml")],
     ["knockout_window 12", "between 1 and 8"], None),
    ("head-index-out-of-range", lambda A: ["edit", *EDIT, "--circuit", str(A["root"] / "head8.json")],
     ["head 8", "heads 0..7"], None),
    # audit
    ("audit-dataset-missing-field", lambda A: ["audit", "--dataset", str(A["root"] / "audit_missing.json")],
     ["record 1", "'subject'"], None),
    ("audit-dataset-invalid-json", lambda A: ["audit", "--dataset", str(A["root"] / "invalid.json")],
     ["not valid JSON"], None),
    ("audit-unknown-relation", lambda A: ["audit", "--relations", "nope", "--limit", "4"],
     ["--relations nope", "relations here"], None),
    ("audit-window-larger-than-layers", lambda A: ["audit", "--window", "9", "--limit", "4"],
     ["larger than the model's 8 layers"], None),
    ("audit-output-not-empty", lambda A: ["audit", "--limit", "4"], ["not empty", "--overwrite"], None),
    ("audit-output-inside-model-folder", lambda A: ["audit", "--model", str(A["demo_copy"]), "--limit", "4"],
     ["model folder", "outside"], "demo_copy"),
    ("fit-cache-is-a-file", lambda A: ["edit", *EDIT, "--fit-cache", str(A["root"] / "fast.yaml")],
     ["fit cache", "not a directory"], None),
    # edit results
    ("nan-in-edit", lambda A: ["edit", "--recipe", str(A["root"] / "fast.yaml"), *EDIT],
     ["NaN or inf", "nothing was saved"], None),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_exit_2_and_nothing_written(case, art, tmp_path, monkeypatch):
    name, make_args, words, model_key = case
    out = tmp_path / "out"
    if name in ("output-not-empty", "audit-output-not-empty"):
        out.mkdir()
        (out / "mine.txt").write_text("keep me")
    if name in ("output-inside-model-folder", "audit-output-inside-model-folder"):
        out = art["demo_copy"] / "edit"
    if name == "nan-in-edit":
        _nan_rank_one(monkeypatch)
    before_out = tree_hash(out) if out.exists() else None
    watched = [DEMO] + ([art[model_key]] if model_key else [])
    before = [tree_hash(m) for m in watched]

    res = invoke([*make_args(art), "--out", str(out)])

    assert res.exit_code == 2, res.output
    assert "Traceback" not in res.output and isinstance(res.exception, SystemExit)
    lines = res.stderr.strip().splitlines()
    errors = [ln for ln in lines if ln.startswith("error:")]
    assert len(errors) == 1 and lines[-1] == errors[0], res.stderr  # one line, and the last one
    for w in words:
        assert w in errors[0], (w, errors[0])
    assert (tree_hash(out) if out.exists() else None) == before_out  # absent, or unchanged
    assert not list(out.parent.glob(f".{out.name}.partial-*"))  # no staging folder left behind
    assert [tree_hash(m) for m in watched] == before  # the base model folder is never written
    assert not (art["root"] / "RAN").exists()  # remote code never ran


# ---- output folders ------------------------------------------------------------------------

def test_overwrite_replaces_the_edit_and_keeps_user_files(art, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(art["adapter"], out)
    (out / "merged").mkdir()  # an edit's own: replaced (here: dropped, as the new edit has no --merge)
    (out / "merged" / "config.json").write_text("{}")
    (out / "notes.txt").write_text("mine")
    (out / "plots").mkdir()
    (out / "plots" / "a.png").write_bytes(b"png")
    old = (out / "edits.json").read_text()
    res = invoke(["edit", "--recipe", str(art["root"] / "fast.yaml"), *FACT, "--target-new", "Tokyo",
                  "--out", str(out), "--overwrite"])
    assert res.exit_code == 0, res.output
    assert (out / "notes.txt").read_text() == "mine" and (out / "plots" / "a.png").read_bytes() == b"png"
    assert not (out / "merged").exists()
    assert (out / "edits.json").read_text() != old
    assert json.loads((out / "edits.json").read_text())["requests"][0]["target_new"] == "Tokyo"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # nothing hidden left beside it


def test_request_fields_never_become_paths(art, tmp_path, monkeypatch):
    """No request field names a file: case ids and subjects with '../' or an absolute path
    leave every file inside --out."""
    work = tmp_path / "work"
    (work / "cwd").mkdir(parents=True)
    monkeypatch.chdir(work / "cwd")
    absolute = Path("/abs")
    existed = absolute.exists()
    reqs = [{"case_id": "../../x", "prompt": "{} was born in", "subject": "../../x", "target_new": "Paris"},
            {"case_id": "/abs/y", "prompt": "{} plays the", "subject": "/abs", "target_new": "guitar"}]
    (tmp_path / "r.json").write_text(json.dumps(reqs))
    before = {p for p in work.rglob("*")}
    res = invoke(["edit", "--recipe", str(art["root"] / "fast.yaml"), "--requests", str(tmp_path / "r.json"),
                  "--mode", "sequential", "--merge", "--out", "out"])
    assert res.exit_code == 0, res.output
    new = {p for p in work.rglob("*")} - before
    assert new and all((work / "cwd" / "out") in p.parents or p == work / "cwd" / "out" for p in new), new
    assert absolute.exists() == existed and not (tmp_path / "x").exists() and not (work / "x").exists()
    assert json.loads((work / "cwd" / "out" / "edits.json").read_text())["requests"][0]["case_id"] == "../../x"


# ---- exactness -----------------------------------------------------------------------------

def test_same_seed_gives_byte_identical_adapter_and_merged_checkpoint(art, tmp_path, demo):
    from safetensors.torch import load_file

    from factedit.editing.weights import applied
    from factedit.verify.run import load_adapter_delta

    model, _, _ = demo
    for d in ("a", "b"):
        res = invoke(["edit", "--recipe", str(art["root"] / "fast.yaml"), *EDIT, "--seed", "3", "--merge",
                      "--out", str(tmp_path / d)])
        assert res.exit_code == 0, res.output
    files = ["adapter_model.safetensors", "adapter_config.json", "merged/model.safetensors", "merged/config.json",
             "merged/tokenizer.json"]
    for f in files:
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes(), f
    # the merged checkpoint is the base plus the adapter's update, bit for bit as factedit adds it
    merged = load_file(str(tmp_path / "a" / "merged" / "model.safetensors"))
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    delta = load_adapter_delta(tmp_path / "a", model)
    with applied(model, delta):
        for n, p in model.named_parameters():
            if n in merged:
                assert torch.equal(merged[n], p), n
    # merge then unmerge: the base weights come back bit for bit
    assert all(torch.equal(p, base[n]) for n, p in model.named_parameters())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_merge_then_unmerge_is_bit_exact_in_every_dtype(dtype):
    from factedit.editing.weights import WeightDelta, applied

    from .families import tiny_model

    model = tiny_model("llama").to(dtype)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    g = torch.Generator().manual_seed(0)
    d = WeightDelta()
    for la in range(3):
        d.add(f"model.layers.{la}.mlp.down_proj", torch.randn(32, 2, generator=g) * 0.3,
              torch.randn(2, 64, generator=g) * 0.1)
        d.add(f"model.layers.{la}.self_attn.v_proj", torch.randn(16, 1, generator=g), torch.randn(1, 32, generator=g))
    for _ in range(3):
        with applied(model, d):
            w = model.model.layers[0].mlp.down_proj.weight
            assert not torch.equal(w, before["model.layers.0.mlp.down_proj.weight"])
        assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


# ---- security defaults ---------------------------------------------------------------------

UNSAFE = [
    (r"\byaml\.(load|unsafe_load|full_load|load_all)\s*\(", "yaml.load: use yaml.safe_load"),
    (r"\byaml\.(Unsafe|Full)?Loader\b", "an unsafe YAML loader"),
    (r"\btorch\.load\s*\(", "torch.load unpickles"),
    (r"\bimport\s+(c?pickle|dill|joblib)\b|\bfrom\s+(c?pickle|dill|joblib)\b", "pickle"),
    (r"\bpickle\.", "pickle"),
    (r"trust_remote_code\s*=\s*True", "trust_remote_code on by default"),
    (r"allow_pickle\s*:\s*bool\s*=\s*True|allow_pickle\s*=\s*True", "pickle on by default"),
    (r"use_safetensors\s*=\s*False|weights_only\s*=\s*False", "pickle weights"),
    (r"(?<![.\w])(eval|exec)\s*\(", "eval/exec"),
]


def test_no_unsafe_loader_in_the_package_source():
    found = []
    for f in sorted(PACKAGE.rglob("*.py")):
        for i, line in enumerate(f.read_text().splitlines(), 1):
            code = line.split("#", 1)[0]
            for pattern, why in UNSAFE:
                if re.search(pattern, code):
                    found.append(f"{f.relative_to(PACKAGE.parent)}:{i}: {why}: {line.strip()}")
    assert not found, "\n".join(found)
    assert "yaml.safe_load" in (PACKAGE / "recipes.py").read_text()


WRITES = r"(?<!atomic_)write_(text|bytes)\(|\bopen\([^)]*['\"][wax]|os\.open\(|savefig\(|save_file\(|torch\.save\(|" \
         r"save_pretrained\(|shutil\.(copy|move)|\.dump\("
ALLOWED_WRITES = {  # file -> the writes allowed there, and why they are atomic
    "factedit/editing/export.py": ("save_pretrained(", "shutil.copyfile("),  # into the staging folder
    "factedit/world/train.py": ("save_pretrained(",),  # into the staging folder
    "factedit/plots.py": ("savefig(buf",),  # to memory, then atomic_write_bytes
    "factedit/audit/store.py": ("os.open(",),  # append-only journal: one write + fsync per record
    "factedit/models/zoo.py": ("save_file(", "save_pretrained(", 'open(src_dir', "copyfileobj("),  # staging folder
    "factedit/cli_launch.py": ('open(logs[r], "w")',),  # a worker's stderr, in a temporary folder removed after
}


def test_every_writer_goes_through_factedit_io():
    """Files are written by factedit.io's helpers (temporary name, then rename) or into a
    staging folder that commit_dir puts in place; no other way of writing is in the package."""
    found = []
    for f in sorted(PACKAGE.rglob("*.py")):
        rel = str(f.relative_to(PACKAGE.parent))
        if rel == "factedit/io.py":
            continue
        for i, line in enumerate(f.read_text().splitlines(), 1):
            code = line.split("#", 1)[0]
            if re.search(WRITES, code) and not any(a in code for a in ALLOWED_WRITES.get(rel, ())):
                found.append(f"{rel}:{i}: {line.strip()}")
    assert not found, "\n".join(found)


def test_loading_defaults_are_safe():
    import inspect

    from factedit.models.loading import load_model

    sig = inspect.signature(load_model)
    assert sig.parameters["allow_pickle"].default is False
    assert sig.parameters["trust_remote_code"].default is False
    for cmd, required in (("locate", FACT), ("edit", ["--out", "x"]), ("verify", ["--out", "x"])):
        params = main.commands[cmd].make_context(cmd, list(required)).params
        assert params["allow_pickle"] is False and params["trust_remote_code"] is False


def test_pickle_and_remote_code_load_only_with_opt_in(art):
    from factedit.errors import ModelLoadError
    from factedit.models.loading import load_model

    with pytest.raises(ModelLoadError, match="--allow-pickle"):
        load_model(art["pickle"])
    model, _ = load_model(art["pickle"], allow_pickle=True)
    assert model.config.n_layer == 2
    # a folder that brings its own code (auto_map) loads with transformers' classes; its code never runs
    model, _ = load_model(art["remote"])
    assert type(model).__module__.startswith("transformers.models.gpt2")
    assert not (art["root"] / "RAN").exists()


# ---- reliability, round 2 (issue 19) ---------------------------------------------------------

def _refused(res, words, code=2):
    """One line ``error: ...`` holding ``words``, the last line of stderr, and exit ``code``."""
    assert res.exit_code == code, res.output
    assert "Traceback" not in res.output and isinstance(res.exception, SystemExit)
    lines = res.stderr.strip().splitlines()
    errors = [ln for ln in lines if ln.startswith("error:")]
    assert len(errors) == 1 and lines[-1] == errors[0], res.stderr
    assert len(errors[0]) <= 1000, len(errors[0])  # a message never echoes a huge value
    for w in words:
        assert w in errors[0], (w, errors[0])
    return errors[0]


def _adapter_copy(A, name: str, cfg=None, tensors=None, manifest=None) -> Path:
    from safetensors.torch import load_file, save_file

    d = Path(shutil.copytree(A["adapter"], A["root"] / name))
    if cfg is not None or tensors is not None:  # an adapter from elsewhere: its manifest records no hashes of its
        m = json.loads((d / "edits.json").read_text())  # files (a changed file with them is refused: test_hostile)
        m.pop("integrity", None)
        (d / "edits.json").write_text(json.dumps(m))
    if cfg is not None:
        c = json.loads((d / "adapter_config.json").read_text())
        (d / "adapter_config.json").write_text(json.dumps(cfg(c)))
    if tensors is not None:
        save_file(tensors(load_file(str(d / "adapter_model.safetensors"))), str(d / "adapter_model.safetensors"))
    if manifest is not None:
        (d / "edits.json").write_text(manifest((d / "edits.json").read_text()))
    return d


def _rename_lora(t: dict, part: str, fn) -> dict:
    return {k: v for k, v in ((k, fn(v)) if part in k else (k, v) for k, v in t.items()) if v is not None}


@pytest.fixture(scope="module")
def art2(art):
    """The artefacts of the round-2 bad inputs, built once."""
    A = dict(art)
    root = art["root"]
    (root / "latin1.yaml").write_bytes("edit: {steps: 5}  # caf\xe9\n".encode("latin-1"))
    (root / "latin1.json").write_bytes('[{"prompt": "{} was born in", "subject": "Caf\xe9", "attribute": "Paris"}]'
                                       .encode("latin-1"))
    (root / "deep.json").write_text("[" * 100_000 + "]" * 100_000)
    (root / "singular.yaml").write_text("edit: {stats: {samples: 1}, insert: {ridge: 0}, keys: {n_prefixes: 2}, "
                                        "fit: {steps: 5}}\n")
    bomb = "a: &a [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{c}: &{c} [*{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}]\n"
        for p, c in zip("abcdefgh", "bcdefghi"))
    (root / "bomb.yaml").write_text(bomb + "edit: {mlp_layers: *i}\n")
    req = {"prompt": "{} was born in", "subject": "Roric Dunnford", "target_new": "Paris"}
    (root / "empty_neighbour.json").write_text(json.dumps([{**req, "neighborhood_prompts": ["Ada was born in", ""]}]))
    (root / "conflict.json").write_text(json.dumps([req, {**req, "prompt": "Roric Dunnford was born in",
                                                          "target_new": "Tokyo"}]))
    for name, layers in (("more_layers", 9), ("fewer_layers", 7)):
        A[name] = _copy_demo(root, name)
        cfg = json.loads((A[name] / "config.json").read_text())
        (A[name] / "config.json").write_text(json.dumps({**cfg, "n_layer": layers}))
    A["no_tensors"] = _copy_demo(root, "no_tensors")
    from safetensors.torch import save_file
    save_file({}, str(A["no_tensors"] / "model.safetensors"))
    res = invoke(["locate", "--prompt", "{} plays the", "--subject", "Roric Dunnford",
                  "--out", str(root / "loc_other")])
    assert res.exit_code == 0, res.output
    A["other_circuit"] = root / "loc_other" / "circuit.json"
    A["audit_corrupt"] = root / "audit_corrupt"
    A["audit_corrupt"].mkdir()
    (A["audit_corrupt"] / "audit.json").write_text("[1, 2")
    A["audit_list"] = root / "audit_list"
    A["audit_list"].mkdir()
    (A["audit_list"] / "audit.json").write_text("[1, 2]")
    # hand-edited adapters
    A["r0"] = _adapter_copy(A, "r0", cfg=lambda c: {**c, "r": 0, "rank_pattern": {}})
    A["r_string"] = _adapter_copy(A, "r_string", cfg=lambda c: {**c, "r": "1", "rank_pattern": {}})
    A["cfg_list"] = _adapter_copy(A, "cfg_list", cfg=lambda c: [c])
    A["no_lora_b"] = _adapter_copy(A, "no_lora_b", tensors=lambda t: _rename_lora(t, "lora_B", lambda v: None))
    A["a_transposed"] = _adapter_copy(A, "a_transposed", tensors=lambda t: _rename_lora(
        t, "lora_A", lambda v: v.T.contiguous()))
    A["manifest_truncated"] = _adapter_copy(A, "manifest_truncated", manifest=lambda m: m[: len(m) // 2])
    A["manifest_incomplete"] = _adapter_copy(A, "manifest_incomplete", manifest=lambda m: json.dumps(
        {k: v for k, v in json.loads(m).items() if k != "requests"}))
    A["manifest_bad_plan"] = _adapter_copy(A, "manifest_bad_plan", manifest=lambda m: json.dumps(
        {**json.loads(m), "plans": [{"mlp_layer": "seven", "heads": 3}]}))
    return A


# (id, arguments (A: the artefacts, O: the output folder), words of the message, model folder that must stay)
CASES_2 = [
    # class 1: inputs that raised a traceback
    ("recipe-not-utf8", lambda A, Out: ["edit", "--recipe", str(A["root"] / "latin1.yaml"), *EDIT, "--out", Out],
     ["recipe file", "not UTF-8"], None),
    ("dataset-not-utf8", lambda A, Out: ["audit", "--dataset", str(A["root"] / "latin1.json"), "--out", Out],
     ["--dataset", "not UTF-8"], None),
    ("requests-nested-too-deeply", lambda A, Out: ["edit", "--requests", str(A["root"] / "deep.json"), "--out", Out],
     ["nested too deeply"], None),
    ("dataset-nested-too-deeply", lambda A, Out: ["audit", "--dataset", str(A["root"] / "deep.json"), "--out", Out],
     ["nested too deeply"], None),
    ("circuit-nested-too-deeply", lambda A, Out: ["edit", *EDIT, "--circuit", str(A["root"] / "deep.json"),
                                                  "--out", Out],
     ["nested too deeply"], None),
    ("device-banana", lambda A, Out: ["edit", *EDIT, "--device", "banana", "--out", Out], ["'banana'", "not a device"],
     None),
    ("device-cuda-not-here", lambda A, Out: ["locate", *FACT, "--device", "cuda:99"], ["--device cuda:99", "GPU"],
     None),
    ("singular-statistics", lambda A, Out: ["edit", "--recipe", str(A["root"] / "singular.yaml"), *EDIT, "--out", Out],
     ["singular", "edit.insert.ridge", "edit.stats.samples"], None),
    ("mechanism-facts-0", lambda A, Out: ["world", "mechanism", "--facts", "0"], ["--facts", "at least 1"], None),
    ("demo-facts-0", lambda A, Out: ["demo", "--facts", "0", "--real-model", "none", "--out", Out], ["--facts"], None),
    ("demo-out-dev-null", lambda A, Out: ["demo", "--real-model", "none", "--out", "/dev/null"], ["not a folder"],
     None),
    ("world-eval-limit-0", lambda A, Out: ["world", "eval", "--limit", "0"], ["--limit", "at least 1"], None),
    ("world-eval-limit-negative", lambda A, Out: ["world", "eval", "--limit", "-1"], ["--limit", "at least 1"], None),
    ("audit-header-corrupt", lambda A, Out: ["audit", "--limit", "4", "--out", str(A["audit_corrupt"])],
     ["audit.json is corrupt", "--overwrite"], None),
    ("audit-header-not-an-object", lambda A, Out: ["audit", "--limit", "4", "--out", str(A["audit_list"])],
     ["audit.json is corrupt", "--overwrite"], None),
    ("adapter-rank-0", lambda A, Out: ["verify", "--adapter", str(A["r0"]), "--out", Out],
     ["not valid", "r must be a positive number"], None),
    ("adapter-rank-a-string", lambda A, Out: ["verify", "--adapter", str(A["r_string"]), "--out", Out],
     ["r must be a positive number", "'1'"], None),
    ("adapter-config-a-list", lambda A, Out: ["verify", "--adapter", str(A["cfg_list"]), "--out", Out],
     ["adapter_config.json holds a list"], None),
    ("adapter-lora-b-missing", lambda A, Out: ["verify", "--adapter", str(A["no_lora_b"]), "--out", Out],
     ["not lora_A and lora_B"], None),
    ("adapter-lora-a-transposed", lambda A, Out: ["verify", "--adapter", str(A["a_transposed"]), "--out", Out],
     ["the factors of", "needs"], None),
    ("edits-json-truncated", lambda A, Out: ["verify", "--adapter", str(A["manifest_truncated"]), "--out", Out],
     ["edits.json", "not valid JSON"], None),
    ("edits-json-incomplete", lambda A, Out: ["verify", "--adapter", str(A["manifest_incomplete"]), "--out", Out],
     ["edits.json", "'requests'"], None),
    ("edits-json-bad-plan", lambda A, Out: ["verify", "--adapter", str(A["manifest_bad_plan"]), "--out", Out],
     ["edits.json", "plan 0 is malformed"], None),
    ("empty-neighbourhood-prompt", lambda A, Out: ["verify", "--adapter", str(A["adapter"]), "--requests",
                                                 str(A["root"] / "empty_neighbour.json"), "--out", Out],
     ["'neighborhood_prompts'", "non-empty strings"], None),
    # class 3: wrong results reported as fine
    ("config-more-layers-than-weights", lambda A, Out: ["edit", "--model", str(A["more_layers"]), *EDIT, "--out", Out],
     ["do not match its config.json", "missing"], "more_layers"),
    ("config-fewer-layers-than-weights", lambda A, Out: ["locate", "--model", str(A["fewer_layers"]), *FACT],
     ["do not match its config.json", "does not describe"], "fewer_layers"),
    ("safetensors-without-tensors", lambda A, Out: ["edit", "--model", str(A["no_tensors"]), *EDIT, "--out", Out],
     ["holds no tensors"], "no_tensors"),
    ("conflicting-requests", lambda A, Out: ["edit", "--requests", str(A["root"] / "conflict.json"), "--out", Out],
     ["requests 0", "and 1", "conflict", "'Paris'", "'Tokyo'"], None),
    ("circuit-for-another-relation", lambda A, Out: ["edit", *EDIT, "--circuit", str(A["other_circuit"]), "--out", Out],
     ["located for the prompt 'Roric Dunnford plays the'", "'Roric Dunnford was born in'"], None),
    ("subject-with-braces", lambda A, Out: ["edit", "--prompt", "Ro{}ric was born in", "--subject", "Ro{}ric",
                                          "--target-new", "Paris", "--out", Out], ["'subject'", "contains '{}'"], None),
    ("subject-with-braces-locate", lambda A, Out: ["locate", "--prompt", "Ro{}ric was born in", "--subject", "Ro{}ric"],
     ["contains '{}'"], None),
    # class 6: writing where it must not; unbounded input
    ("demo-out-in-model-folder", lambda A, Out: ["demo", "--model", str(A["demo_copy"]), "--real-model", "none",
                                               "--out", str(A["demo_copy"] / "figs")], ["model folder"], "demo_copy"),
    ("yaml-alias-bomb", lambda A, Out: ["edit", "--recipe", str(A["root"] / "bomb.yaml"), *EDIT, "--out", Out],
     ["expands to more than"], None),
]


@pytest.mark.parametrize("case", CASES_2, ids=[c[0] for c in CASES_2])
def test_bad_input_round_2_is_one_line_exit_2_and_nothing_written(case, art2, tmp_path):
    name, make_args, words, model_key = case
    out = tmp_path / "out"
    args = make_args(art2, str(out))
    watched = [DEMO] + ([art2[model_key]] if model_key else [])
    before = [tree_hash(m) for m in watched]
    outs = [out, art2["audit_corrupt"], art2["audit_list"]]
    before_out = [tree_hash(o) if o.exists() else None for o in outs]

    res = invoke(args)

    _refused(res, words)
    assert [tree_hash(o) if o.exists() else None for o in outs] == before_out
    assert not list(tmp_path.glob(".out.partial-*"))
    assert [tree_hash(m) for m in watched] == before


@pytest.mark.parametrize("template, prompt", [
    ("{} was born in {name}", "Ada was born in {name}"),
    ("{} was born in {0}", "Ada was born in {0}"),
    ("{ {} was born in", "{ Ada was born in"),
    ("{} was born in }", "Ada was born in }"),
])
def test_audit_templates_are_filled_by_replacing_not_str_format(template, prompt, tmp_path):
    from factedit.audit.dataset import load_facts

    for rec in ({"template": template, "subject": "Ada", "attribute": "Rome"},
                {"case_id": 1, "requested_rewrite": {"prompt": template, "subject": "Ada", "target_true": "Rome"}}):
        (tmp_path / "d.json").write_text(json.dumps([rec]))
        assert load_facts(tmp_path / "d.json")[0].prompt == prompt


# ---- output locations: checked before anything is computed ---------------------------------

def _loop(tmp: Path) -> str:
    (tmp / "loop").symlink_to(tmp / "loop")
    return str(tmp / "loop")


def _link_to_folder(tmp: Path) -> str:
    (tmp / "real").mkdir()
    (tmp / "link").symlink_to(tmp / "real")
    return str(tmp / "link")


def _read_only(tmp: Path) -> str:
    return "/proc/factedit-out"  # a folder no one can create files in, even root


OUTS = [  # (id, the --out to give, words)
    ("symlink-loop", _loop, ["symbolic link"]),
    ("symlink-to-a-folder", _link_to_folder, ["symbolic link"]),
    ("in-a-read-only-folder", _read_only, ["not writable"]),
    ("current-folder", lambda t: ".", ["current folder"]),
    ("parent-folder", lambda t: "..", ["current folder"]),
    ("a-device", lambda t: "/dev/null", ["not a folder"]),
]
COMMANDS = {  # command -> its arguments before --out
    "edit": ["edit", *EDIT, "--overwrite"],
    "locate": ["locate", *FACT, "--overwrite"],
    "verify": ["verify", "--overwrite"],
    "audit": ["audit", "--limit", "4", "--overwrite"],
    "demo": ["demo", "--real-model", "none"],
}


@pytest.mark.parametrize("command", sorted(COMMANDS))
@pytest.mark.parametrize("case", OUTS, ids=[c[0] for c in OUTS])
def test_output_location_is_checked_before_computing(case, command, tmp_path, monkeypatch):
    import factedit.models.loading as loading

    def never(*a, **k):
        raise AssertionError("the model was loaded before the output location was checked")

    monkeypatch.setattr(loading, "load_model", never)
    work = tmp_path / "a" / "b"
    work.mkdir(parents=True)
    monkeypatch.chdir(work)
    _, make_out, words = case
    out = make_out(work)
    before = tree_hash(tmp_path)
    _refused(invoke([*COMMANDS[command], "--out", out]), words)
    assert tree_hash(tmp_path) == before


# ---- exit codes: one per meaning -------------------------------------------------------------

def _requests_file(A, name: str, **fields) -> str:
    req = {"prompt": "{} was born in", "subject": "Roric Dunnford", "target_new": "Paris", **fields}
    (A["root"] / name).write_text(json.dumps([req]))
    return str(A["root"] / name)


def _crash(monkeypatch):
    from factedit.verify import run as verify_run  # factedit.verify is the function; the stage is its package

    def boom(**kw):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(verify_run, "verify", boom)


# (id, arguments (A, Out), setup(monkeypatch), exit code, words of the error line or None)
EXIT_CODES = [
    ("pass", lambda A, Out: ["verify", "--adapter", str(A["adapter"]), "--no-fluency", "--requests",
                             _requests_file(A, "pass.json", neighborhood_prompts=["Roric Dunnford plays the"]),
                             "--out", Out], None, 0, None),
    ("an-edit-failed", lambda A, Out: ["verify", "--adapter", str(A["adapter"]), "--no-fluency", "--requests",
                                       _requests_file(A, "tokyo.json", target_new="Tokyo"), "--out", Out],
     None, 1, None),
    ("an-edit-failed-with-no-fail", lambda A, Out: ["verify", "--adapter", str(A["adapter"]), "--no-fluency",
                                                    "--no-fail", "--requests",
                                                    _requests_file(A, "tokyo.json", target_new="Tokyo"), "--out", Out],
     None, 0, None),
    ("a-fit-that-did-not-move-its-target", lambda A, Out: ["edit", "--recipe", str(A["root"] / "diverge.yaml"), *EDIT,
                                                           "--out", Out],
     None, 1, ["did not move its target", "NLL", "nothing was saved", "edit.fit.lr"]),
    ("bad-input", lambda A, Out: ["verify", "--adapter", str(A["root"] / "loc"), "--out", Out], None, 2,
     ["not a PEFT adapter folder"]),
    ("internal-error", lambda A, Out: ["verify", "--adapter", str(A["adapter"]), "--out", Out], _crash, 3,
     ["internal error", "ZeroDivisionError", "a bug", "FACTEDIT_DEBUG=1"]),
]


@pytest.mark.parametrize("case", EXIT_CODES, ids=[c[0] for c in EXIT_CODES])
def test_exit_codes_say_what_happened(case, art, tmp_path, monkeypatch):
    name, make_args, setup, code, words = case
    (art["root"] / "diverge.yaml").write_text("edit: {stats: {samples: 2000}, keys: {n_prefixes: 2}, "
                                              "fit: {steps: 5, lr: 1.0e+30}}\n")
    if setup is not None:
        setup(monkeypatch)
    out = tmp_path / "out"
    res = invoke(make_args(art, str(out)))
    if words is not None:
        _refused(res, words, code)
        assert not out.exists()  # nothing written
    else:
        assert res.exit_code == code, res.output
        assert (out / "report.json").is_file()
        report = json.loads((out / "report.json").read_text())
        assert (report["summary"]["passed"] == report["summary"]["n_edits"]) == (name == "pass")


# ---- verify judges what plain peft loads ---------------------------------------------------------

def test_verify_judges_the_adapter_as_peft_loads_it(art, tmp_path, demo):
    """An adapter whose config targets other modules loads in peft as doing nothing: verify
    must not pass it (the same adapter with its own targets passes efficacy)."""
    from peft import PeftModel

    from factedit.verify.run import load_adapter_delta

    model, tok, _ = demo
    other = _adapter_copy(art, "other_targets", cfg=lambda c: {**c, "target_modules": ["c_attn"]})
    # plain peft: the adapter changes nothing
    base = tf.AutoModelForCausalLM.from_pretrained(DEMO)
    ids = torch.tensor([tok.encode("Roric Dunnford was born in")])
    with torch.no_grad():
        before = base(input_ids=ids).logits
        peft_logits = PeftModel.from_pretrained(base, other)(input_ids=ids).logits
    assert torch.allclose(before, peft_logits)
    assert not list(load_adapter_delta(other, model).modules())  # what peft loads: nothing
    assert list(load_adapter_delta(art["adapter"], model).modules())  # its own targets: the update is there
    reqs = _requests_file(art, "own.json")
    ok = invoke(["verify", "--adapter", str(art["adapter"]), "--no-fluency", "--requests", reqs,
                 "--out", str(tmp_path / "own")])
    res = invoke(["verify", "--adapter", str(other), "--no-fluency", "--requests", reqs, "--out", str(tmp_path / "o")])
    assert res.exit_code == 1, res.output
    assert "target_modules do not select" in res.stderr
    own = json.loads((tmp_path / "own" / "report.json").read_text())["edits"][0]["metrics"]
    theirs = json.loads((tmp_path / "o" / "report.json").read_text())["edits"][0]["metrics"]
    assert own["efficacy_score"] == 1.0 and theirs["efficacy_score"] == 0.0, (ok.output, res.output)


def test_target_true_the_model_does_not_predict_is_warned(art, tmp_path):
    res = invoke(["edit", "--recipe", str(art["root"] / "fast.yaml"), *EDIT, "--target-true", "Tokyo",
                  "--out", str(tmp_path / "tokyo")])
    assert res.exit_code == 0, res.output
    assert "warning: request 0: the model predicts ' Madrid'" in res.stderr and "'Tokyo'" in res.stderr
    res = invoke(["edit", "--recipe", str(art["root"] / "fast.yaml"), *EDIT, "--target-true", "Madrid",
                  "--out", str(tmp_path / "madrid")])
    assert res.exit_code == 0 and "warning" not in res.stderr, res.output


# ---- strict JSON ---------------------------------------------------------------------------------

def _strict(text: str):
    def refuse(c):
        raise ValueError(f"not strict JSON: {c}")

    return json.loads(text, parse_constant=refuse)


def test_report_of_a_nan_adapter_is_strict_json(art, tmp_path):
    nan = _adapter_copy(art, "nan_adapter", tensors=lambda t: _rename_lora(t, "lora_B", lambda v: v * float("nan")))
    res = invoke(["verify", "--adapter", str(nan), "--no-fluency", "--out", str(tmp_path / "v")])
    assert res.exit_code == 1, res.output  # a NaN edit fails; it is judged, not crashed on
    report = _strict((tmp_path / "v" / "report.json").read_text())
    assert report["edits"][0]["passed"] is False


@pytest.mark.parametrize("value, expected", [
    (float("nan"), None), (float("inf"), None), (-float("inf"), None), ([1.5, float("nan")], [1.5, None]),
    ({"a": (float("nan"),)}, {"a": [None]})])
def test_json_is_written_strict(value, expected, tmp_path):
    from factedit.io import atomic_write_json, dumps_json

    assert _strict(dumps_json(value)) == expected
    atomic_write_json(tmp_path / "x.json", {"v": value})
    assert _strict((tmp_path / "x.json").read_text()) == {"v": expected}


def test_every_json_writer_is_strict():
    """JSON is written by factedit.io.dumps_json (NaN -> null, allow_nan=False), nowhere else."""
    found = []
    for f in sorted(PACKAGE.rglob("*.py")):
        rel = str(f.relative_to(PACKAGE.parent))
        if rel == "factedit/io.py":
            continue
        for i, line in enumerate(f.read_text().splitlines(), 1):
            if re.search(r"\bjson\.dumps?\(", line.split("#", 1)[0]):
                found.append(f"{rel}:{i}: {line.strip()}")
    assert not found, "\n".join(found)


# ---- permissions follow the umask ----------------------------------------------------------------

@pytest.mark.parametrize("mask", [0o022, 0o077, 0o002])
def test_outputs_follow_the_umask(mask, art, tmp_path):
    import os
    import stat

    old = os.umask(mask)
    try:
        res = invoke(["edit", "--recipe", str(art["root"] / "fast.yaml"), *EDIT, "--merge",
                      "--out", str(tmp_path / "e")])
        assert res.exit_code == 0, res.output
        res = invoke(["locate", *FACT, "--out", str(tmp_path / "loc")])
        assert res.exit_code == 0, res.output
    finally:
        os.umask(old)
    for p in [tmp_path / "e", tmp_path / "e" / "merged", tmp_path / "loc", *(tmp_path / "e").rglob("*"),
              *(tmp_path / "loc").iterdir()]:
        want = (0o777 if p.is_dir() else 0o666) & ~mask
        assert stat.S_IMODE(p.stat().st_mode) == want, (p, oct(p.stat().st_mode), oct(want))


@pytest.mark.parametrize("mask", [0o002, 0o077])
def test_audit_journal_follows_the_umask(mask, tmp_path):
    import os
    import stat

    from factedit.audit.store import FactStore

    old = os.umask(mask)
    try:
        FactStore(tmp_path).append({"index": 0})
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "facts.jsonl").stat().st_mode) == 0o666 & ~mask


# ---- audits: --overwrite removes only the audit's files; resumed records belong to their facts ----

def test_audit_overwrite_removes_only_the_audits_own_files(tmp_path):
    from factedit.audit.report import FIGURES
    from factedit.audit.run import OWN_FILES, prepare_dir

    out = tmp_path / "audit"
    out.mkdir()
    own = [*OWN_FILES, *FIGURES, "facts.shard0-of2.jsonl"]
    for name in own:
        (out / name).write_text("old")
    mine = ["my_plot.png", "notes.txt", "facts.backup.jsonl"]
    for name in mine:
        (out / name).write_text("keep me")
    prepare_dir(out, {"format": "factedit.audit/1"}, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == sorted([*mine, "audit.json"])
    assert all((out / n).read_text() == "keep me" for n in mine)


def _heldout(A):  # the same model and dataset, with the held-out templates: the indices now mean other prompts
    return A["world_facts"](True)[: A["n"]]


def _edit_attribute(A):  # the dataset file was edited: one fact's attribute changed
    facts = A["facts"]
    return [*facts[:2], dataclasses.replace(facts[2], attribute="Tokyo"), *facts[3:]]


def _tamper_line(A):  # a hand-edited line that parses but does not hold a record's fields
    lines = (A["out"] / "facts.jsonl").read_text().splitlines()
    rec = json.loads(lines[1])
    rec["knockout"] = "x"
    lines[1] = json.dumps(rec, sort_keys=True)
    (A["out"] / "facts.jsonl").write_text("\n".join(lines) + "\n")
    return A["facts"]


def _wrong_status(A):
    lines = (A["out"] / "facts.jsonl").read_text().splitlines()
    rec = json.loads(lines[0])
    rec["status"] = 5
    lines[0] = json.dumps(rec)
    (A["out"] / "facts.jsonl").write_text("\n".join(lines) + "\n")
    return A["facts"]


RESUMES = [  # (id, change between the two runs -> the facts of the second run)
    ("heldout-added", _heldout),
    ("dataset-edited", _edit_attribute),
    ("record-tampered", _tamper_line),
    ("status-tampered", _wrong_status),
]


@pytest.mark.slow
@pytest.mark.parametrize("case", RESUMES, ids=[c[0] for c in RESUMES])
def test_resumed_audit_keeps_only_records_of_the_current_facts(case, demo, tmp_path):
    from factedit.analysis.circuit import LocateConfig
    from factedit.audit.dataset import world_facts
    from factedit.audit.run import belongs, run_audit, world_related
    from factedit.audit.store import read_records

    model, tok, world = demo
    n = 8
    out = tmp_path / "audit"
    kw = dict(model=model, tokenizer=tok, out=out, config=LocateConfig(knockout_window=3, attribute_top_k=10),
              dataset_name="world", related_of=world_related(world, tok), progress=False, log=lambda m: None)
    facts = world_facts(world)[:n]
    run_audit(facts, **kw)
    A = {"facts": facts, "out": out, "n": n, "world_facts": lambda h: world_facts(world, h)}
    second = case[1](A)
    changed = [f.index for f, g in zip(facts, second) if (f.prompt, f.attribute) != (g.prompt, g.attribute)]
    s = run_audit(second, **kw)
    recs = {r["index"]: r for r in read_records(out / "facts.jsonl")}
    assert all(belongs(recs[f.index], f) for f in second)  # every record is of the fact it is filed under
    assert s["run"]["facts_this_run"] >= max(1, len(changed))  # the stale ones were recomputed
    assert s["run"]["facts_this_run"] < n or case[0] == "heldout-added"  # the others were kept
    again = run_audit(second, **kw)
    assert again["run"]["facts_this_run"] == 0  # and now all are current
