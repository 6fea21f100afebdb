"""One file per model family; importing this package registers them all."""

from factedit.models.families import gpt2  # noqa: F401
