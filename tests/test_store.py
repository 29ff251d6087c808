"""The store interface over a real TCPStore: semantics, timeouts, errors, key names, records."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from datetime import timedelta

import pytest

from megatron_unicron.store import (
    JobKeys,
    StoreAddressInUse,
    StoreTimeout,
    StoreUnavailable,
    TCPStoreBackend,
    append_record,
    clear_worker_keys,
    connect_store,
    host_store,
    lease_age,
    read_records,
    renew_lease,
)


@pytest.fixture
def stores() -> Iterator[tuple[TCPStoreBackend, TCPStoreBackend]]:
    host = host_store("127.0.0.1", 0)
    client = connect_store("127.0.0.1", host.address[1], timedelta(seconds=10))
    yield host, client
    client.close()
    host.close()


def test_basic_operations(stores: tuple[TCPStoreBackend, TCPStoreBackend]) -> None:
    host, client = stores
    client.set("a", "1")
    assert host.get("a", timedelta(seconds=1)) == b"1"
    assert client.try_get("missing") is None
    assert client.add("n", 2) == 2 and host.add("n", 3) == 5
    client.append("log", "x")
    host.append("log", b"y")
    assert client.get("log", timedelta(seconds=1)) == b"xy"
    assert client.check(["a", "n"]) and not client.check(["a", "missing"])
    assert client.list_keys("lo") == ["log"]
    assert client.delete("a") and not client.delete("a")
    other = client.clone()
    other.set("from-clone", "1")
    assert host.check(["from-clone"])
    other.close()


def test_compare_set_first_writer_wins(stores: tuple[TCPStoreBackend, TCPStoreBackend]) -> None:
    host, client = stores
    assert client.compare_set("k", "", "first") == b"first"
    assert host.compare_set("k", "", "second") == b"first"
    assert host.compare_set("k", "first", "third") == b"third"
    assert client.compare_set("absent", "something", "x") == b""  # not set: the key did not hold that
    assert not client.check(["absent"])


def test_wait_times_out(stores: tuple[TCPStoreBackend, TCPStoreBackend]) -> None:
    _, client = stores
    t0 = time.monotonic()
    with pytest.raises(StoreTimeout):
        client.wait(["never"], timedelta(seconds=0.3))
    assert 0.25 < time.monotonic() - t0 < 5
    with pytest.raises(StoreTimeout):
        client.get("never", timedelta(seconds=0.1))


def test_hosting_on_a_busy_port_is_a_clear_error() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        with pytest.raises(StoreAddressInUse, match="already in use"):
            host_store("127.0.0.1", busy.getsockname()[1])


def test_connecting_to_nothing_gives_up_after_the_timeout() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t0 = time.monotonic()
    with pytest.raises(StoreUnavailable, match="cannot reach the store"):
        connect_store("127.0.0.1", port, timedelta(seconds=0.5))
    assert time.monotonic() - t0 < 5


def test_losing_the_host_is_reported_as_unavailable() -> None:
    host = host_store("127.0.0.1", 0)
    client = connect_store("127.0.0.1", host.address[1], timedelta(seconds=5))
    host.close()
    del host
    with pytest.raises(StoreUnavailable, match="lost the store"):
        client.try_get("x")


def test_key_names() -> None:
    keys = JobKeys("job1")
    assert keys.lease("node1") == "unicron/job1/nodes/node1/lease"
    assert keys.gen(2).faults == "unicron/job1/gen2/faults"
    assert keys.gen(2).decision == "unicron/job1/gen2/decision"
    assert keys.gen(0).process_groups == "unicron/job1/gen0/pg"
    assert keys.attempt(1).failure == "unicron/job1/attempt1/failure"
    with pytest.raises(ValueError):
        JobKeys("a/b")
    with pytest.raises(ValueError):
        keys.gen(-1)


def test_leases_and_records(stores: tuple[TCPStoreBackend, TCPStoreBackend]) -> None:
    host, client = stores
    assert lease_age(client, "lease") is None
    renew_lease(client, "lease", now=100.0)
    assert lease_age(host, "lease", now=103.5) == pytest.approx(3.5)

    def report(worker: int) -> None:
        store = client.clone()
        for i in range(20):
            append_record(store, "faults", {"worker": worker, "i": i})
        store.close()

    threads = [threading.Thread(target=report, args=(w,)) for w in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    records = read_records(host, "faults")
    assert sorted((r["worker"], r["i"]) for r in records) == [(w, i) for w in range(4) for i in range(20)]
    assert read_records(host, "nothing") == []


def test_clear_worker_keys_keeps_the_project_keys(stores: tuple[TCPStoreBackend, TCPStoreBackend]) -> None:
    host, client = stores
    client.set("default_pg/0//cpu//0/0", "addr")
    client.set("unicron/job/spec", "{}")
    assert clear_worker_keys(host) == 1
    assert host.list_keys() == ["unicron/job/spec"]
