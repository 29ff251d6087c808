"""Errors raised by the plan generator and the simulator for bad user input.

Every error carries a one-line message that names the offending field and what to do, so a CLI can
print it as is (no traceback) and exit non-zero.
"""


class PlanInputError(ValueError):
    """Bad input to the plan generator: a model shape, a layout, a cluster file or a throughput table."""


class NoFeasibleLayoutError(PlanInputError):
    """No (TP, PP, DP, micro-batch) layout of the job fits the GPUs offered."""
