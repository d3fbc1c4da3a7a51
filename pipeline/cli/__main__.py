"""`python -m pipeline.cli` is the `greetflow` command."""

from pipeline.cli import main

raise SystemExit(main())
