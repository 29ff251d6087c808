"""Fault schedules: parsing, errors, and firing once at the right iteration and phase."""

import pytest

from megatron_unicron.errors import ConfigError
from megatron_unicron.events import ErrorKind, Phase
from megatron_unicron.taxonomy import classify_exception
from megatron_unicron.testing.injector import (
    ERROR_KINDS,
    FaultInjector,
    InjectedFault,
    parse_spec,
    schedule_from,
)


def test_parse_full_and_default_phase():
    assert parse_spec("kill:3:5") == parse_spec("kill:3:5:forward")
    spec = parse_spec("slow=1.5:2:10:p2p", index=4)
    assert (spec.kind, spec.factor, spec.rank, spec.iteration, spec.phase, spec.index) == (
        "slow",
        1.5,
        2,
        10,
        Phase.P2P,
        4,
    )
    assert str(spec) == "slow=1.5:2:10:p2p"


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("kill:3", "expected KIND:RANK:ITER"),
        ("explode:1:2", "unknown kind 'explode'"),
        ("kill:x:2", "must be integers"),
        ("kill:1:0", "ITER >= 1"),
        ("kill:1:2:sideways", "unknown phase 'sideways'"),
        ("slow=fast:1:2", "slow=FACTOR needs a number"),
    ],
)
def test_bad_specs_are_one_line_errors(text, fragment):
    with pytest.raises(ConfigError) as error:
        parse_spec(text)
    assert fragment in str(error.value) and "\n" not in str(error.value)


def test_schedule_merges_flags_and_environment():
    schedule = schedule_from(["kill:0:3"], {"UNICRON_INJECT": "ecc:1:4:optimizer, exit:2:5"})
    assert [str(s) for s in schedule] == ["kill:0:3:forward", "ecc:1:4:optimizer", "exit:2:5:forward"]
    assert [s.index for s in schedule] == [0, 1, 2]


@pytest.mark.parametrize("kind", ERROR_KINDS)
def test_error_kinds_raise_their_real_text_once(kind):
    injector = FaultInjector(schedule_from([f"{kind}:1:3:backward"], {}), rank=1)
    injector(3, Phase.FORWARD)  # wrong phase
    injector(2, Phase.BACKWARD)  # wrong iteration
    with pytest.raises(InjectedFault) as error:
        injector(3, Phase.BACKWARD)
    assert classify_exception(error.value) is ErrorKind(kind)
    injector(3, Phase.BACKWARD)  # fires once only
    assert injector.fired[kind] == 1


def test_other_ranks_faults_are_ignored_and_job_wide_claim_is_respected():
    claims = []
    injector = FaultInjector(
        schedule_from(["ecc:0:1", "ecc:1:1"], {}),
        rank=1,
        mark_fired=lambda spec, rec: claims.append(spec) and False,
    )
    injector(1, Phase.FORWARD)  # claimed elsewhere already (mark_fired returns False): nothing raised
    assert [s.rank for s in claims] == [1] and injector.fired["ecc"] == 0


def test_slow_factor():
    injector = FaultInjector(schedule_from(["slow=1.5:0:2"], {}), rank=0)
    injector(2, Phase.FORWARD)
    assert injector.fired["slow"] == 1 and injector.delay_for(0.2) == pytest.approx(0.1)
