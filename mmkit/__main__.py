"""`python -m mmkit ...` (also `accelerate launch -m mmkit eval ...` for multi-process evaluation)."""

from mmkit.cli import main

main()
