"""`factedit verify`: load the base model and the edit (an adapter folder or a merged
checkpoint), check every edit, and write ``report.json`` and a self-contained ``report.html``."""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from safetensors.torch import load_file

from factedit.analysis.circuit import RecallCircuit
from factedit.analysis.locate import config_for_model
from factedit.editing.export import parse_peft_key, peft_key
from factedit.editing.plan import EditPlan
from factedit.editing.requests import EditRequest, check_conflicts, load_requests, parse_record
from factedit.editing.weights import WeightDelta, applied
from factedit.errors import FactEditError, shown
from factedit.io import atomic_write_text, dumps_json, read_json
from factedit.models.adapter import ModelLayout
from factedit.models.fingerprint import model_fingerprint
from factedit.verify.checks import EditReport, Neighbour, PromptSet, VerifyOptions, verify_edit, world_prompts
from factedit.world.generate import World


class AdapterMismatchError(FactEditError):
    pass


def check_adapter_folder(path: Path) -> tuple[Path, Path]:
    cfg_path, w_path = path / "adapter_config.json", path / "adapter_model.safetensors"
    if not cfg_path.is_file() or not w_path.is_file():
        raise FactEditError(f"--adapter {path} is not a PEFT adapter folder (needs adapter_config.json and "
                            "adapter_model.safetensors): pass a folder written by `factedit edit`")
    return cfg_path, w_path


class AdapterError(FactEditError):
    pass


# adapter_config.json options that change what the adapter computes and that factedit does not
# reproduce: refused rather than judged wrongly
_UNSUPPORTED = {"use_dora": False, "lora_bias": False, "layers_to_transform": None, "layers_pattern": None,
                "modules_to_save": None, "use_qalora": False, "bias": "none"}


def _bad_adapter(path: Path, problem: str) -> AdapterError:
    return AdapterError(f"the adapter in {path} is not valid: {problem}: pass a folder written by `factedit edit` "
                        "(or re-create the adapter)")


def load_adapter_config(path: Path) -> dict:
    cfg_path, _ = check_adapter_folder(path)
    cfg = read_json(cfg_path, "adapter config")
    if not isinstance(cfg, dict):
        raise _bad_adapter(path, f"adapter_config.json holds a {type(cfg).__name__}, not an object")
    if cfg.get("peft_type", "LORA") != "LORA":
        raise _bad_adapter(path, f"peft_type is {shown(cfg.get('peft_type'))}; factedit checks LoRA adapters")
    for key, default in _UNSUPPORTED.items():
        if cfg.get(key, default) not in (default, None, False, [], {}):
            raise _bad_adapter(path, f"{key} is {shown(cfg.get(key))}, which factedit's verify does not reproduce")

    def positive(v, where):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
            raise _bad_adapter(path, f"{where} must be a positive number, got {shown(v)}")
        return v

    positive(cfg.get("r", 8), "r")
    positive(cfg.get("lora_alpha", 8), "lora_alpha")
    for pat in ("rank_pattern", "alpha_pattern"):
        v = cfg.get(pat) or {}
        if not isinstance(v, dict):
            raise _bad_adapter(path, f"{pat} must be an object, got {shown(v)}")
        for k, x in v.items():
            positive(x, f"{pat}[{k!r}]")
    tm = cfg.get("target_modules")
    if not (tm is None or isinstance(tm, str) or (isinstance(tm, list) and all(isinstance(t, str) for t in tm))):
        raise _bad_adapter(path, f"target_modules must be a list of module names or a regex, got {shown(tm)}")
    for key in ("target_modules", "exclude_modules"):
        if isinstance(cfg.get(key), str):
            try:
                re.compile(cfg[key])
            except re.error as exc:
                raise _bad_adapter(path, f"{key} {shown(cfg[key])} is not a valid regular expression ({exc})") from None
        elif cfg.get(key) is not None and not (isinstance(cfg[key], list) and all(isinstance(t, str)
                                                                                  for t in cfg[key])):
            raise _bad_adapter(path, f"{key} must be a list of module names or a regex, got {shown(cfg[key])}")
    return cfg


def load_adapter_delta(path: str | Path, model, log: Callable[[str], None] = lambda m: None) -> WeightDelta:
    """A PEFT LoRA adapter folder as a WeightDelta, judged as plain peft loads it: only the
    modules its ``target_modules`` select take their LoRA weights (B scaled by alpha / r, or
    alpha / sqrt(r) with ``use_rslora``); weights for other modules are dropped, as peft drops
    them. A malformed config or weights (a rank of 0, a missing or transposed factor) are
    refused."""
    from peft.tuners.tuners_utils import check_target_module_exists
    from peft.utils.other import get_pattern_key

    path = Path(path)
    _, w_path = check_adapter_folder(path)
    cfg = load_adapter_config(path)
    try:
        tensors = load_file(str(w_path))
    except Exception as exc:  # safetensors raises its own error types
        raise FactEditError(f"{w_path} is not a readable safetensors file: {exc}") from exc
    lcfg = peft_targets(path, cfg, model)
    adapter = ModelLayout(model)
    delta = WeightDelta(conv1d=adapter.spec.conv1d)
    names = {}
    for k in tensors:
        parsed = parse_peft_key(k)
        if parsed is None:
            raise _bad_adapter(path, f"the weight {shown(k)} is not a LoRA factor of the base model")
        names.setdefault(parsed[0], set()).add(parsed[1])
    dropped = []
    for name in sorted(names):
        if names[name] != {"A", "B"}:
            raise _bad_adapter(path, f"{name} has the LoRA factor(s) {sorted('lora_' + p for p in names[name])}, "
                                     "not lora_A and lora_B")
        try:
            module = model.get_submodule(name)
        except AttributeError as exc:
            raise AdapterMismatchError(f"the adapter in {path} edits {name}, which this model does not have: it was "
                                       "made for another model") from exc
        if not check_target_module_exists(lcfg, name):
            dropped.append(name)  # peft does not wrap this module: its weights are not loaded
            continue
        a, b = tensors[peft_key(name, "A")], tensors[peft_key(name, "B")]
        r = (cfg.get("rank_pattern") or {}).get(get_pattern_key(list(cfg.get("rank_pattern") or {}), name),
                                                cfg.get("r", 8))
        alpha = (cfg.get("alpha_pattern") or {}).get(get_pattern_key(list(cfg.get("alpha_pattern") or {}), name),
                                                     cfg.get("lora_alpha", 8))
        w = getattr(module, "weight", None)
        if w is None or w.dim() != 2:
            raise _bad_adapter(path, f"{name} has no 2-D weight for LoRA to update")
        out_f, in_f = (w.shape[1], w.shape[0]) if adapter.spec.conv1d else (w.shape[0], w.shape[1])
        if a.dim() != 2 or b.dim() != 2 or a.shape != (r, in_f) or b.shape != (out_f, r):
            raise _bad_adapter(path, f"the factors of {name} are lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)}; "
                                     f"rank {r} on this module needs ({r}, {in_f}) and ({out_f}, {r})")
        scale = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
        delta.add(name, b * scale, a)
    if dropped:
        log(f"warning: the adapter holds weights for {len(dropped)} module(s) its target_modules do not select "
            f"({', '.join(dropped[:3])}{', ...' if len(dropped) > 3 else ''}): peft does not load them, so they are "
            "judged as absent")
    return delta


def peft_targets(path: Path, cfg: dict, model):
    """The adapter's LoraConfig with ``target_modules`` resolved exactly as peft resolves them
    when it loads the adapter onto ``model``: none given, the family's default targets; the
    shorthand ``"all-linear"``, every linear layer but the output head (peft's own function)."""
    import copy

    from peft import LoraConfig
    from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING

    known = set(LoraConfig.__dataclass_fields__)
    try:
        lcfg = LoraConfig(**{k: copy.deepcopy(v) for k, v in cfg.items()
                             if k in known and k not in ("peft_type", "task_type")})
    except (TypeError, ValueError) as exc:
        raise _bad_adapter(path, f"peft cannot read adapter_config.json ({str(exc).splitlines()[0][:200]})") from None
    if lcfg.target_modules is None:  # as peft's LoraModel._prepare_adapter_config
        default = TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING.get(model.config.model_type)
        if default is None:
            raise _bad_adapter(path, "it names no target_modules, and peft has no default ones for a "
                                     f"{model.config.model_type} model")
        lcfg.target_modules = default if isinstance(default, str) else set(default)
    if isinstance(lcfg.target_modules, str) and lcfg.target_modules.lower() == "all-linear":
        try:
            from peft.tuners.tuners_utils import _maybe_include_all_linear_layers
        except ImportError:  # pragma: no cover - a peft without it
            raise _bad_adapter(path, "target_modules is 'all-linear', which this peft version cannot resolve "
                                     "here: list the modules") from None
        lcfg = _maybe_include_all_linear_layers(lcfg, model)
    return lcfg


def read_manifest(path: Path) -> dict:
    """An adapter's ``edits.json``, checked: a truncated or hand-edited one is a one-line error."""
    m = read_json(path, "the edit manifest")
    fix = "restore it from the edit, or pass the requests with --requests FILE"
    if not isinstance(m, dict):
        raise FactEditError(f"{path} holds a {type(m).__name__}, not an object: {fix}")
    reqs = m.get("requests")
    if not isinstance(reqs, list) or not reqs:
        raise FactEditError(f"{path} has no list of 'requests': {fix}")
    for key in ("plans", "circuits"):
        v = m.get(key)
        if v is not None and (not isinstance(v, list) or (v and len(v) != len(reqs))):
            raise FactEditError(f"{path}: '{key}' must be a list of one entry per request ({len(reqs)}): {fix}")
    for i, p in enumerate(m.get("plans") or []):
        try:
            manifest_plan(p, f"plan {i}")
        except FactEditError as exc:
            raise FactEditError(f"{path}: {exc}: {fix}") from None
    if any(c is not None and not isinstance(c, dict) for c in m.get("circuits") or []):
        raise FactEditError(f"{path}: every entry of 'circuits' must be an object: {fix}")
    if not isinstance(m.get("base_fingerprint", ""), (str, type(None))):
        raise FactEditError(f"{path}: 'base_fingerprint' must be a string: {fix}")
    return m


def manifest_plan(plan: dict | None, where: str = "plan") -> EditPlan | None:
    """An entry of ``edits.json``'s ``plans`` as the editing stage's :class:`EditPlan` (None
    stays None: no plan known)."""
    return None if plan is None else EditPlan.from_dict(plan, where)


REPORT_FORMAT = "factedit.verify/1"


@dataclass
class VerifySummary:
    """Over all edits: how many pass (and how many are incomplete: not failed, but a check that
    needs prompts could not run), and the mean of each metric (None where no edit has it)."""
    n_edits: int
    passed: int
    efficacy_score: float | None = None
    paraphrase_score: float | None = None
    neighbourhood_score: float | None = None
    reliability_accuracy: float | None = None
    generalisation_accuracy: float | None = None
    locality_accuracy: float | None = None
    fluency_before: float | None = None
    fluency_after: float | None = None
    portability: float | None = None  # share of consequences that follow the new target, where any
    portability_moved: float | None = None
    incomplete: int = 0

    @classmethod
    def of(cls, reports: list[EditReport]) -> VerifySummary:
        means = {}
        for f in fields(cls)[2:-1]:  # the metrics
            vals = [r.metrics[f.name] for r in reports if r.metrics.get(f.name) is not None]
            means[f.name] = sum(vals) / len(vals) if vals else None
        return cls(len(reports), sum(r.passed for r in reports), **means,
                   incomplete=sum(r.verdict == "incomplete" for r in reports))


@dataclass
class VerifyReport:
    """What :func:`verify` finds; :meth:`to_dict` is ``report.json``."""
    base_model: str
    base_fingerprint: str
    edit: str  # the adapter folder or merged checkpoint checked
    options: VerifyOptions
    summary: VerifySummary
    edits: list[EditReport]

    @property
    def all_passed(self) -> bool:
        return self.summary.passed == self.summary.n_edits

    def to_dict(self) -> dict:
        return {"format": REPORT_FORMAT, "base_model": self.base_model, "base_fingerprint": self.base_fingerprint,
                "edit": self.edit, "options": asdict(self.options), "summary": asdict(self.summary),
                "edits": [asdict(r) for r in self.edits]}


def _check_args(model, tokenizer, adapter, edited, requests, options) -> tuple[VerifyOptions, Path]:
    """verify's arguments checked as the command line checks them: the options and the folder."""
    from factedit.validate import check_instance, check_model_args, check_path_arg

    check_model_args(model, tokenizer, "verify")
    if model is None or isinstance(model, (str, Path)):
        raise FactEditError("verify: pass the loaded base model and its tokenizer (factedit.load_model)")
    check_instance(options, VerifyOptions, "verify: options", "a VerifyOptions")
    if (adapter is None) == (edited is None):
        raise FactEditError("give exactly one of --adapter DIR and --edited MERGED_DIR")
    folder = check_path_arg(adapter if adapter is not None else edited, "--adapter" if adapter is not None
                            else "--edited")
    if requests is not None and not isinstance(requests, (str, Path)):
        if not isinstance(requests, (list, tuple)) or not requests or not all(isinstance(r, EditRequest)
                                                                              for r in requests):
            raise FactEditError(f"verify: requests must be a non-empty list of EditRequest or a request file, got "
                                f"{shown(requests)}")
    if adapter is not None:
        check_adapter_folder(folder)
    elif not (folder / "config.json").is_file():
        raise FactEditError(f"--edited {folder} is not a model checkpoint (it has no config.json): pass the merged "
                            "checkpoint of an edit (DIR/merged), or the edit's folder with --adapter")
    return options or VerifyOptions(), folder


def _what_to_check(requests, manifest: dict | None, manifest_path: Path, folder: Path):
    """The requests to check, with the plans and circuits the edit recorded for them (None
    when the requests were given rather than read from ``edits.json``)."""
    if isinstance(requests, (str, Path)):
        requests = load_requests(requests)
    if requests is not None:
        check_conflicts(requests)  # as edit refuses them: both cannot be met
        return requests, [None] * len(requests), [None] * len(requests)
    if manifest is None:
        raise FactEditError(f"no edits.json next to {folder}: pass --requests FILE")
    try:
        requests = [parse_record(r, i) for i, r in enumerate(manifest["requests"])]
    except FactEditError as exc:
        raise FactEditError(f"{manifest_path}: {exc}") from None
    plans: list[EditPlan | None] = [manifest_plan(p) for p in manifest.get("plans") or []] or [None] * len(requests)
    circuits: list[RecallCircuit | None] = [
        None if c is None else RecallCircuit.from_dict(c, f"{manifest_path} circuit {i}")
        for i, c in enumerate(manifest.get("circuits") or [])]
    return requests, plans, circuits or [None] * len(requests)


def _edited_model(model, adapter, edited, folder: Path, manifest: dict | None, log) -> Callable:
    """A function giving a context manager under which the edit is in force: the adapter
    applied to ``model`` in place, or the merged checkpoint loaded beside it."""
    from factedit.integrity import check_folder_integrity

    if adapter is not None:
        delta = load_adapter_delta(adapter, model, log)
        if manifest is not None:  # after the checks of form: a changed file is refused here
            check_folder_integrity(folder, manifest, log)

        @contextmanager
        def applied_adapter():
            with applied(model, delta):
                yield None
        return applied_adapter
    from factedit.models.loading import load_model

    try:
        edited_model, _ = load_model(edited)
    except FactEditError as exc:
        raise FactEditError(f"--edited {edited}: {exc}") from None
    if edited_model.config.model_type != model.config.model_type:
        raise AdapterMismatchError(f"{edited} is a {edited_model.config.model_type} model, the base a "
                                   f"{model.config.model_type}")
    return lambda: nullcontext(edited_model)


PromptSource = Callable[[EditRequest, str], "PromptSet | None"]  # (request, true attribute) -> prompts


def verify(*, model, tokenizer, adapter: str | Path | None = None, edited: str | Path | None = None,
           requests: list[EditRequest] | str | Path | None = None, options: VerifyOptions | None = None,
           prompts: PromptSource | None = None, log: Callable[[str], None] = lambda m: None) -> VerifyReport:
    """Check edits on ``model`` (loaded, with its ``tokenizer``): an ``adapter`` folder written
    by `factedit edit`, or an ``edited`` merged checkpoint. ``requests``: the edits to check
    (default: the folder's ``edits.json``).

    Paraphrase and neighbour prompts come from the request itself; else, on the demo world,
    from its templates and entities; else from ``prompts`` (e.g.
    :func:`factedit.studies.verify_prompts.pool_prompts`, which the command line uses). An edit
    with neither is judged "incomplete", unless ``options.allow_missing`` allows it."""
    from factedit.integrity import check_folder_integrity

    opts, folder = _check_args(model, tokenizer, adapter, edited, requests, options)
    manifest_path = folder / "edits.json" if adapter is not None else folder.parent / "edits.json"
    manifest = read_manifest(manifest_path) if manifest_path.is_file() else None
    if manifest is not None and edited is not None:  # its requests: the merged checkpoint itself is not hashed
        check_folder_integrity(manifest_path.parent, manifest, log, files=False)
    fp = model_fingerprint(model)
    if manifest is not None and manifest.get("base_fingerprint") not in (None, fp):
        raise AdapterMismatchError(
            f"the edit in {folder} was made on another base model (fingerprint {manifest['base_fingerprint']}, "
            f"this model {fp}): pass the base model it was made on with --model")
    requests, plans, circuits = _what_to_check(requests, manifest, manifest_path, folder)
    ctx = _edited_model(model, adapter, edited, folder, manifest, log)
    world = World.of(model)
    lc = config_for_model(model)
    reports: list[EditReport] = []
    for i, (req, plan, circuit) in enumerate(zip(requests, plans, circuits)):
        rep = verify_edit(model, tokenizer, ctx, req, circuit, plan, lc, opts, _prompts_for(req, world, prompts))
        reports.append(rep)
        log(f"[{i + 1}/{len(requests)}] {rep.verdict.upper()} {req.filled_prompt!r} -> "
            f"{req.target_new!r}" + ("" if rep.passed else ": " + "; ".join(rep.reasons)))
    return VerifyReport(str(getattr(model, "name_or_path", "")), fp, str(folder), opts, VerifySummary.of(reports),
                        reports)


def _prompts_for(req: EditRequest, world, source: PromptSource | None) -> Callable[[str], PromptSet | None]:
    """The prompts beyond the edit's own, as a function of the true attribute: the request's
    own where it gives any; else the demo world's; else ``source``'s; each list filled from
    the first that has it."""
    def found(true: str) -> PromptSet | None:
        own = PromptSet(list(req.paraphrase_prompts), [Neighbour(p) for p in req.neighborhood_prompts], "request")
        if own.paraphrases and own.neighbours:
            return own
        built = world_prompts(world, req) if world is not None else None
        if built is None and source is not None:
            built = source(req, true)
        if built is None:
            return own
        if not own.paraphrases and not own.neighbours:
            return built
        return PromptSet(own.paraphrases or built.paraphrases, own.neighbours or built.neighbours,
                         f"request and {built.source}")
    return found


def write_report(report: VerifyReport, out: str | Path) -> list[Path]:
    from factedit.verify.html import render_html

    out = Path(out)
    data = report.to_dict()
    atomic_write_text(out / "report.json", dumps_json(data, indent=1))  # strict: NaN -> null
    atomic_write_text(out / "report.html", render_html(data))
    return [out / "report.json", out / "report.html"]
