"""`factedit audit` (where a model retrieves its knowledge, across a dataset) and
`factedit study` (the paper's measurements)."""

from __future__ import annotations

import click

from factedit.cli_common import Bounded as _Bounded
from factedit.cli_common import load as _load
from factedit.cli_common import model_options as _model_options
from factedit.errors import FactEditError, shown


@click.command()
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
@click.option("--processes", type=_Bounded("processes"), default=1, show_default=True,
              help="Audit in N processes on this machine (data parallel, as under `accelerate launch`); the "
                   "input is checked once, before they start.")
def audit(model_path, dtype, device, allow_pickle, trust_remote_code, device_map, dataset, out, limit, relations,
          heldout, paraphrases, recipe_path, window, overwrite, no_progress, processes) -> None:
    """Map where a model retrieves its knowledge across a dataset (resumable; data-parallel
    with --processes N, or under `accelerate launch -m factedit audit ...`)."""
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
    if processes > 1:
        _launch(click.get_current_context(), processes, model_path, allow_pickle, trust_remote_code, recipe_path)
        return
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


def _launch(ctx: click.Context, processes: int, model_path, allow_pickle, trust_remote_code, recipe_path) -> None:
    """The input checked here, then the audit in ``processes`` processes (factedit/cli_launch.py)."""
    import os
    import sys

    from factedit.analysis.circuit import load_locate_config
    from factedit.cli_launch import command_args, run_processes
    from factedit.models.loading import check_model_source

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise FactEditError("--processes starts its own processes: drop it under `accelerate launch` or torchrun")
    check_model_source(model_path, allow_pickle, trust_remote_code)
    if recipe_path:
        load_locate_config(recipe_path).validate()
    code = run_processes(command_args(ctx), processes, lambda m: click.echo(m, err=True))
    if code:
        sys.exit(code)


@click.command()
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
@click.option("--no-progress", is_flag=True, help="No progress bars (shown on a terminal, per stage and fact).")
def study(model_path, dtype, device, allow_pickle, trust_remote_code, dataset, out, limit, related, paraphrases,
          description_tokens, no_two_hop, recipe_path, raw_unembed, overwrite, no_progress) -> None:
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
                  out=out, log=lambda m: click.echo(m, err=True), progress=not no_progress).summary
    click.echo(f"{s['facts_known']} of {s['facts_scanned']} facts known; related text: {s['related_source']}; "
               f"{s['seconds']['total']:.0f} s")
    click.echo(format_table(s["table"], str(model_path or "demo world")))
    click.echo(f"wrote {out}/study.json, table.md and figures")
