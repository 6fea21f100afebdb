"""What the command groups share: bounded numeric options and the model options and loading."""

from __future__ import annotations

import click

from factedit.errors import FactEditError, shown
from factedit.validate import BOUNDS, number


class Bounded(click.ParamType):
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


def model_options(f):
    f = click.option("--trust-remote-code", is_flag=True, help="Allow the model's own Python code (off by default).")(f)
    f = click.option("--allow-pickle", is_flag=True, help="Allow loading pickle (.bin) weights (off by default).")(f)
    f = click.option("--device", default=None, help="Device, e.g. cuda:0 (default: CPU).")(f)
    f = click.option("--dtype", default="float32", show_default=True, help="float32, bfloat16 or float16.")(f)
    f = click.option("--model", "model_path", default=None,
                     help="Model folder, .gguf file, hub id, or a named model (smollm2-135m, gemma3-270m; "
                          "see `factedit models`). Default: the embedded demo model.")(f)
    return f


def load(model_path, dtype, device, allow_pickle, trust_remote_code):
    from factedit.models.loading import load_model

    return load_model(model_path, dtype=dtype, device=device, allow_pickle=allow_pickle,
                      trust_remote_code=trust_remote_code)


def check_one_token(tok, prompt: str, subject: str, target: str) -> None:
    """locate follows one token: refuse a target of several rather than silently cut it."""
    from factedit.analysis.spans import fill_prompt, target_token_ids

    ids = target_token_ids(tok, fill_prompt(prompt, subject)[0], target)
    if len(ids) > 1:
        pieces = [tok.decode([i]) for i in ids]
        raise FactEditError(f"--target {target!r} is {len(ids)} tokens {pieces}, and locate follows one token: "
                            f"pass its first token (--target {pieces[0]!r}) or a one-token attribute")
