"""`python -m ragbeam ...` is the `ragbeam` command."""
import sys

from pipeline.cli import main

sys.exit(main())
