"""The ``factedit`` command line: a thin layer over the Python API."""

from __future__ import annotations

import os
import sys
import traceback

import click

from factedit.cli_common import Bounded as _Bounded
from factedit.cli_common import check_one_token as _check_one_token
from factedit.cli_common import load as _load
from factedit.cli_common import model_options as _model_options
from factedit.cli_models import models, world
from factedit.cli_pools import pools
from factedit.cli_recipe import recipe
from factedit.cli_study import audit, study
from factedit.editing.config import METHODS
from factedit.errors import EXIT_BAD_INPUT, EXIT_EDIT_FAILED, EXIT_INTERNAL, EXIT_INTERRUPTED, FactEditError, shown
from factedit.io import dumps_json

MAX_ERROR_LINE = 1000  # characters of an error line: a message never echoes a whole (huge) value


def _fail(message: str, code: int) -> None:
    line = " ".join(message.split())  # one line
    if len(line) > MAX_ERROR_LINE:
        line = line[: MAX_ERROR_LINE - 3] + "..."
    click.echo(f"error: {line}", err=True)
    sys.exit(code)


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
@click.option("--scope", type=click.Choice(["both", "subject", "relation"]), default=None,
              help="Method circuit: which located components to update: both (the subject's MLP and the "
                   "extraction heads; the default), subject (the subject's MLP only), relation (the last position's "
                   "MLP just after the subject is read; on SmolLM2 it changed the answer for most other subjects too: "
                   "verify it with neighbours). Overrides the recipe's edit.site.scope.")
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
             requests_path, out, method, scope, mode, recipe_path, circuit_paths, stats_corpus, merge, overwrite,
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
                             ("--seed", seed is not None), ("--scope", scope is not None)) if on]
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
    if scope is not None:
        cfg = dataclasses.replace(cfg, scope=scope)
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
@click.option("--allow-missing", multiple=True, type=click.Choice(["paraphrases", "neighbours"]),
              help="Let an edit pass without this check when it has no such prompts and none can be built "
                   "(repeatable). Without it such an edit is 'incomplete' (exit 1).")
def verify(model_path, dtype, device, allow_pickle, trust_remote_code, adapter_dir, edited_dir, requests_path, out,
           overwrite, no_fail, no_fluency, allow_missing) -> None:
    """Check edits: metrics and the flow re-analysis on the edited model, with a verdict each.

    Paraphrase and neighbour prompts come from each request; where it has none, from the demo
    world or, on a real model, from the request pools' relation templates and facts."""
    from factedit.editing.requests import load_requests
    from factedit.models.zoo import model_dir
    from factedit.paths import check_output_dir
    from factedit.verify.checks import VerifyOptions
    from factedit.verify.run import verify as run_verify
    from factedit.verify.run import write_report

    check_output_dir(out, overwrite, model_dir(model_path))
    requests = load_requests(requests_path) if requests_path is not None else None  # before the model is loaded
    options = VerifyOptions(fluency=not no_fluency, allow_missing=allow_missing)
    model, tok = _load(model_path, dtype, device, allow_pickle, trust_remote_code)
    from factedit.studies.verify_prompts import pool_prompts

    report = run_verify(model=model, tokenizer=tok, adapter=adapter_dir, edited=edited_dir, requests=requests,
                        options=options, prompts=pool_prompts(model, tok), log=lambda m: click.echo(m, err=True))
    write_report(report, out)
    _print_verdicts(report, out)
    if not report.all_passed and not no_fail:
        sys.exit(EXIT_EDIT_FAILED)


def _print_verdicts(report, out: str) -> None:
    """One row per edit (verdict, ES / PS / NS, the edit), what each check did, the summary."""
    s = report.summary
    click.echo(f"{'#':>3}  {'verdict':10s} {'ES':>5s} {'PS':>5s} {'NS':>5s}  edit")
    for i, e in enumerate(report.edits, 1):
        m, r = e.metrics, e.request
        f = (lambda v: "  n/a" if v is None else f"{v:5.2f}")  # noqa: E731
        click.echo(f"{i:3d}  {e.verdict if e.passed else e.verdict.upper():10s} {f(m['efficacy_score'])} "
                   f"{f(m['paraphrase_score'])} {f(m['neighbourhood_score'])}  "
                   f"{r['prompt'].replace('{}', r['subject'])} -> {r['target_new']}"
                   + ("" if e.passed else f"  [{'; '.join(e.reasons)}]"))
        click.echo("     checks: " + "; ".join(f"{k} {v}" for k, v in e.checks.items() if v != "reported"))
    extra = f", {s.incomplete} incomplete" if s.incomplete else ""
    if s.portability is not None:
        extra += f"; portability {s.portability:.2f} (mean over the edits whose consequences are known)"
    click.echo(f"{s.passed}/{s.n_edits} edits pass{extra}; wrote {out}/report.json and {out}/report.html")


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


for _command in (models, world, audit, study, pools):
    main.add_command(_command)
