"""`python -m avgguf ...`: the same as the `avgguf` command."""

import sys

from avgguf.cli import main

sys.exit(main())
