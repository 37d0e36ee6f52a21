import sys

from forgerpc.orchestrator.cli import main

sys.exit(main())
