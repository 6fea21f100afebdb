"""``factedit pools``: named request pools (list, build, count), a thin layer over
:mod:`factedit.studies.pools`."""

from __future__ import annotations

from pathlib import Path

import click

from factedit.errors import FactEditError
from factedit.io import atomic_write_text, dumps_json


def _log(message: str) -> None:
    click.echo(message, err=True)


def _model(name: str, model_path: str | None, dtype: str, device: str | None):
    from factedit.models.loading import load_model
    from factedit.studies.pools import pool_info

    if not pool_info(name).needs_model:
        return None, None
    if model_path is None:
        raise FactEditError(f"the {name} pool keeps the facts a model knows: give --model (e.g. --model smollm2-135m)")
    return load_model(model_path, dtype=dtype, device=device)


def _relations(text: str | None) -> tuple[str, ...] | None:
    return None if text is None else tuple(r.strip() for r in text.split(",") if r.strip())


def _options(f):
    f = click.option("--device", default=None, help="Device, e.g. cuda:0 (default: CPU).")(f)
    f = click.option("--dtype", default="float32", show_default=True, help="float32, bfloat16 or float16.")(f)
    f = click.option("--no-cache", is_flag=True, help="Build anew, neither reading nor writing the pool cache.")(f)
    f = click.option("--max-neighbours", type=int, default=10, show_default=True,
                     help="Held-out neighbours per (relation, attribute): each request's neighbourhood prompts.")(f)
    f = click.option("--relations", default=None, metavar="A,B",
                     help="places: only these relations (e.g. leave out the continents, which a model may guess).")(f)
    f = click.option("--seed", type=int, default=0, show_default=True, help="Order, roles and new targets.")(f)
    f = click.option("--model", "model_path", default=None,
                     help="The model whose knowledge filters the pool: a named model (smollm2-135m, gemma3-270m) "
                          "or a folder. Not needed for the insertion pool.")(f)
    return f


@click.group()
def pools() -> None:
    """Named request pools, reproducible by seed: list, build, count (docs/pools.md)."""


@pools.command("list")
@click.option("--json", "as_json", is_flag=True, help="Everything, as JSON.")
def pools_list(as_json: bool) -> None:
    """The pools: names, relations and templates (main prompt first)."""
    from factedit.studies.pools import list_pools

    rows = list_pools()
    if as_json:
        click.echo(dumps_json(rows, indent=2))
        return
    for p in rows:
        model = "needs --model" if p["needs_model"] else "no model needed"
        click.echo(f"{p['name']} (version {p['version']}, {model}): {p['description']}")
        for r in p["relations"]:
            kind = f" [{r['subject_kind']}]" if r["subject_kind"] else ""
            note = "" if r.get("editable", True) else " (kept as other facts, not edited)"
            click.echo(f"  {r['name']}{kind}{note}: " + " | ".join(r["templates"][:3])
                       + (f" | ... ({len(r['templates'])} templates)" if len(r["templates"]) > 3 else ""))


@pools.command("build")
@click.argument("name")
@_options
@click.option("--limit", type=int, default=None, help="The first N requests only (the same as the full pool's).")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="Request file to write (JSONL).")
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists.")
def pools_build(name, model_path, seed, relations, max_neighbours, no_cache, dtype, device, limit, out,
                overwrite) -> None:
    """Write the pool's requests as a request file for `factedit edit --requests`."""
    from factedit.studies.pools import build_pool

    path = Path(out)
    if path.exists() and not overwrite:
        raise FactEditError(f"--out {out} exists: choose a new file or pass --overwrite")
    if path.is_dir():
        raise FactEditError(f"--out {out} is a folder: give a file path, e.g. {path / 'requests.jsonl'}")
    model, tok = _model(name, model_path, dtype, device)
    built = build_pool(name, model, tok, seed=seed, limit=limit, max_neighbours=max_neighbours,
                       cache=not no_cache, log=_log, relations=_relations(relations))
    if not built.requests:
        raise FactEditError(f"the {name} pool holds no request for this model: it knows none of the pool's facts")
    atomic_write_text(path, "".join(dumps_json(r, ensure_ascii=False) + "\n" for r in built.records()))
    source = "from the cache" if built.cached else f"built in {built.seconds:.0f} s"
    click.echo(f"wrote {len(built.requests)} {name} requests (seed {seed}) to {out} ({source})")


@pools.command("count")
@click.argument("name")
@_options
@click.option("--json", "json_path", default=None, type=click.Path(dir_okay=False),
              help="Also write the counts as JSON to this file.")
def pools_count(name, model_path, seed, relations, max_neighbours, no_cache, dtype, device, json_path) -> None:
    """Per relation: facts, known facts, requests; and the requests with pairwise-disjoint subjects."""
    from factedit.studies.pools import build_pool, count_table, pool_relations

    model, tok = _model(name, model_path, dtype, device)
    chosen = _relations(relations)
    built = build_pool(name, model, tok, seed=seed, max_neighbours=max_neighbours, cache=not no_cache, log=_log,
                       relations=chosen)
    table = count_table(built, [r for r in pool_relations(name) if chosen is None or r["name"] in chosen])
    table["max_neighbours"] = max_neighbours
    click.echo(format_counts(table))
    if json_path:
        atomic_write_text(Path(json_path), dumps_json(table, indent=1))
        click.echo(f"wrote {json_path}")


def format_counts(t: dict) -> str:
    lines = [f"{t['pool']} on {t['model'] or 'no model'}, seed {t['seed']}", "",
             "| relation | subject | known / facts | one answer | requests |", "|---|---|---|---|---|"]
    for r in t["relations"]:
        known = f"— / {r['facts']}" if r["known"] is None else f"{r['known']} / {r['facts']}"
        one = "—" if r.get("one_answer") is None else r["one_answer"]
        lines.append(f"| {r['relation']} | {r['subject_kind'] or '—'} | {known} | {one} | {r['requests']} |")
    if t["model"] is not None:
        lines += ["", f"subjects: {t['subjects_known']} known of {t['subjects']}; held out as neighbours: "
                      f"{'—' if t['held_out_neighbours'] is None else t['held_out_neighbours']}"]
    when = "cached; built in" if t["cached"] else "built in"
    lines.append(f"requests with pairwise-disjoint subjects: {t['requests']} ({when} {t['seconds']:.0f} s)")
    return "\n".join(lines)
