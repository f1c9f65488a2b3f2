"""pytest set-up of the molecule scenarios' testinfra tests: fixtures from testlib.py."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from testlib import deploy_vars, runbook, service  # noqa: F401  (fixtures)
