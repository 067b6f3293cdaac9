"""The raw-RQ side of bench/engine.py: a job that does nothing.

It takes one integer, as Keel's jobs carry ids only, and returns an empty dict, as the
``keel.noop`` node does, so both sides move the same shape of message and result.
"""


def noop(index: int) -> dict:
    return {}
