"""Every error kind's real text classifies back to that kind, with the paper's severities."""

import pytest

from megatron_unicron.events import Action, ErrorKind, Severity
from megatron_unicron.taxonomy import KINDS, action_for, classify_exception, classify_message, error_text

EXCEPTION_KINDS = [
    k for k in ErrorKind if k not in (ErrorKind.TASK_HANG, ErrorKind.EXITED, ErrorKind.LOST_NODE)
]


@pytest.mark.parametrize("kind", EXCEPTION_KINDS, ids=lambda k: k.value)
def test_real_error_text_classifies_back(kind):
    if kind is ErrorKind.OTHER:
        assert classify_message("ValueError: shapes do not match") is ErrorKind.OTHER
    else:
        assert classify_message(error_text(kind)) is kind


def test_shares_sum_to_the_papers_total():
    assert sum(info.share_percent for info in KINDS.values()) == pytest.approx(43.4)


def test_severity_table():
    sev1 = {k for k, i in KINDS.items() if i.severity is Severity.SEV1}
    sev3 = {k for k, i in KINDS.items() if i.severity is Severity.SEV3}
    assert sev1 == {ErrorKind.ECC, ErrorKind.NVLINK, ErrorKind.DMA, ErrorKind.DRIVER, ErrorKind.LOST_NODE}
    assert sev3 == {
        ErrorKind.NCCL_TIMEOUT,
        ErrorKind.NETWORK,
        ErrorKind.LINK_FLAP,
        ErrorKind.CONN_REFUSED,
        ErrorKind.CONN_RESET,
    }
    assert action_for(Severity.SEV3) is Action.REATTEMPT and action_for(Severity.SEV1) is Action.RECONFIGURE


def test_gloo_messages_seen_on_this_machine():
    # measured texts (shared notes, megatron-on-cpu §5)
    assert classify_message("Connection closed by peer [127.0.0.1]:8067") is ErrorKind.CONN_RESET
    assert (
        classify_message("Timed out waiting 10000ms for recv operation to complete") is ErrorKind.NCCL_TIMEOUT
    )


def test_exception_chain_and_types():
    try:
        try:
            raise ConnectionResetError("peer went away")
        except ConnectionResetError as inner:
            raise RuntimeError("step failed") from inner
    except RuntimeError as outer:
        assert classify_exception(outer) is ErrorKind.CONN_RESET
    assert classify_exception(ConnectionRefusedError()) is ErrorKind.CONN_REFUSED
    assert classify_exception(RuntimeError(error_text(ErrorKind.ECC))) is ErrorKind.ECC
