"""`python -m pipeline ...` is `distill ...` (and what `accelerate launch -m pipeline` runs)."""

from pipeline.cli import main

main()
