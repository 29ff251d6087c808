"""Convert a Megatron-LM checkpoint to another TP/PP layout and/or format (``unicron-convert``).

Runs from the repository root without installation: ``python tools/convert_checkpoint.py --help``.
"""

from __future__ import annotations

import os
import sys

try:
    import megatron_unicron  # noqa: F401
except ImportError:
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_unicron.ckpt.convert import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
