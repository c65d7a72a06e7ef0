import sys

from depgraph_llm.cli.commands import main

sys.exit(main())
