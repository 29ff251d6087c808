"""A minimal CLI over parse_args, run as a subprocess by the tests: the run_cli pattern of the scripts.

Prints the parsed arguments as one JSON object. With WORLD_SIZE in the environment (as torchrun sets it)
the arguments are also checked against that world size.
"""

import dataclasses
import json
import os

from megatron_unicron.errors import run_cli
from megatron_unicron.megatron.args import parse_args, resolve_world


def main() -> int:
    args = parse_args()
    if "WORLD_SIZE" in os.environ:
        args = resolve_world(args, int(os.environ["WORLD_SIZE"]))
    fields = {f.name: getattr(args, f.name) for f in dataclasses.fields(args) if f.name != "provenance"}
    fields["unicron"] = args.unicron.to_dict()
    print(json.dumps(fields, sort_keys=True))
    return 0


if __name__ == "__main__":
    run_cli(main)
