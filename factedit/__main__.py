"""`python -m factedit ...` (and `accelerate launch -m factedit ...`)."""

from factedit.cli import main

main()
