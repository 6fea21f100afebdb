"""One file per model family; importing this package registers them all."""

from factedit.models.families import gemma3, gpt2, gpt_neox, gptj, llama, opt, phi  # noqa: F401
