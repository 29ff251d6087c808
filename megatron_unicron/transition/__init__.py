"""Transitions: move a running job's state to a new parallel layout from the nearest valid copies."""
