"""Entry point: python -m bayling.eval SUBCOMMAND (see --help)."""
from .cli import main

raise SystemExit(main())
