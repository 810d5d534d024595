"""python -m avgguf.cli"""

from avgguf.cli.commands import main

raise SystemExit(main())
