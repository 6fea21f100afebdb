"""The ``factedit`` command line: a thin layer over the Python API."""

from __future__ import annotations

import sys

import click

from factedit.errors import FactEditError


class _Group(click.Group):
    """Turns factedit's own errors into one clear line and exit code 2."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except FactEditError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(2)


@click.group(cls=_Group)
@click.version_option(package_name="factedit")
def main() -> None:
    """factedit: locate, edit and verify facts through their recall circuits."""


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
    from factedit.paths import check_output_dir
    from factedit.world.recipe import WorldRecipe
    from factedit.world.train import train_world

    recipe = WorldRecipe.load(recipe_path)
    check_output_dir(out, overwrite)
    train_world(recipe, out, save_every=save_every_eval, log=lambda m: click.echo(m, err=True))


@world.command("eval")
@click.option("--model", "model_path", default=None, help="Model folder (default: the embedded demo model).")
@click.option("--limit", type=int, default=None, help="Only the first N entities.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON only.")
def world_eval(model_path: str | None, limit: int | None, as_json: bool) -> None:
    """Recall on the training templates and on the held-out templates."""
    import json

    from factedit.models.loading import load_model
    from factedit.world.evaluate import evaluate_recall
    from factedit.world.generate import World

    model, tok = load_model(model_path)
    world = World.load(model.name_or_path)
    rec = evaluate_recall(model, tok, world, max_entities=limit)
    if as_json:
        click.echo(json.dumps(rec))
        return
    click.echo(f"recall, training templates: {rec['recall_train_templates']:.2%} "
               f"of {rec['n_train_templates']} prompts")
    click.echo(f"recall, held-out templates: {rec['recall_heldout_templates']:.2%} "
               f"of {rec['n_heldout_templates']} prompts (paraphrase_test entities)")


@world.command("mechanism")
@click.option("--model", "model_path", default=None, help="Model folder (default: the embedded demo model).")
@click.option("--facts", "n_facts", type=int, default=200, show_default=True, help="Facts to sample.")
@click.option("--window", type=int, default=None, help="Knockout window (default: the recipe's).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON only.")
def world_mechanism(model_path: str | None, n_facts: int, window: int | None, as_json: bool) -> None:
    """Measure the recall mechanism: knockout, attribute rate, extraction heads."""
    import json

    from factedit.models.loading import load_model
    from factedit.world.generate import World
    from factedit.world.mechanism import measure_mechanism

    model, tok = load_model(model_path)
    world = World.load(model.name_or_path)
    if window is None:
        window = int(world.meta.get("recipe", {}).get("analysis", {}).get("knockout_window", 3))
    rep = measure_mechanism(model, tok, world, n_facts=n_facts, window=window)
    full = {"summary": rep.summary(), "knockout": rep.knockout, "attribute_rate": rep.attribute_rate,
            "attribute_rate_control": rep.attribute_rate_control, "top_heads": rep.top_heads}
    if as_json:
        click.echo(json.dumps(full))
        return
    for k, v in rep.summary().items():
        click.echo(f"{k:36s} {v}")
    for s, curve in rep.knockout.items():
        click.echo(f"knockout {s:12s} " + " ".join(f"{x:7.1f}" for x in curve))
    click.echo("attribute rate      " + " ".join(f"{x:5.2f}" for x in rep.attribute_rate))
    click.echo("control             " + " ".join(f"{x:5.2f}" for x in rep.attribute_rate_control))
    click.echo("top heads (layer, head, share at rank 1): " + ", ".join(
        f"L{a}H{b} {c:.2f}" for a, b, c in rep.top_heads[:5]))


@main.command()
@click.option("--model", "model_path", default=None, help="Model folder (default: the embedded demo model).")
@click.option("--out", default="demo-output", show_default=True, type=click.Path(file_okay=False))
@click.option("--facts", "n_facts", type=int, default=8, show_default=True)
def demo(model_path: str | None, out: str, n_facts: int) -> None:
    """The demo on the embedded model: facts being recalled, and the recall mechanism."""
    from factedit.demo import run_demo

    run_demo(model_path, out, n_facts, echo=click.echo)
