"""Writes this worker's whole environment as JSON to <dir>/env-<RANK>.json (dir: first argument)."""

import json
import os
import sys

with open(os.path.join(sys.argv[1], f"env-{os.environ['RANK']}.json"), "w") as f:
    json.dump(dict(os.environ), f)
