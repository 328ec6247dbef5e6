import multiprocessing
import os

import filelock
import pytest

from vibatch.errors import LockTimeout, NoFreeSlot, ResourceRequestError
from vibatch.core.slots import Capacity, SlotAllocator


def alloc(tmp_path, cpus=(0, 1, 2, 3), mem=4096, timeout=5.0):
    return SlotAllocator(str(tmp_path), Capacity(tuple(cpus), mem), timeout)


def test_claim_release_and_reuse(tmp_path):
    a = alloc(tmp_path)
    s1, new1 = a.claim("j1", 2, 1024)
    s2, new2 = a.claim("j2", 2, 1024)
    assert new1 and new2 and set(s1.cpus).isdisjoint(s2.cpus) and len(s1.cpus) == 2
    with pytest.raises(NoFreeSlot, match="not enough free CPUs"):
        a.claim("j3", 1, 128)
    assert a.release("j1") == s1
    assert a.release("j1") is None          # releasing twice is harmless
    s3, _ = a.claim("j3", 2, 1024)
    assert s3.cpus == s1.cpus


def test_claim_twice_returns_same_slot(tmp_path):
    a = alloc(tmp_path)
    s, new = a.claim("j1", 2, 512)
    again, new_again = a.claim("j1", 2, 512)
    assert new and not new_again and again == s
    with pytest.raises(ResourceRequestError, match="already holds"):
        a.claim("j1", 1, 512)


def test_state_survives_a_new_allocator(tmp_path):
    s, _ = alloc(tmp_path).claim("j1", 1, 256)
    assert alloc(tmp_path).get("j1") == s


def test_memory_accounting(tmp_path):
    a = alloc(tmp_path, mem=1000)
    a.claim("j1", 1, 600)
    with pytest.raises(NoFreeSlot, match="not enough free memory"):
        a.claim("j2", 1, 600)


def test_request_larger_than_node(tmp_path):
    a = alloc(tmp_path, cpus=(0, 1), mem=1000)
    with pytest.raises(ResourceRequestError, match="at most 2"):
        a.claim("j", 3, 100)
    with pytest.raises(ResourceRequestError, match="at most 1000 MiB"):
        a.claim("j", 1, 2000)
    assert a.all() == {}


def test_exact_cpus(tmp_path):
    a = alloc(tmp_path)
    s, _ = a.claim("j1", 2, 100, cpus=[3, 1])
    assert s.cpus == (1, 3)
    with pytest.raises(NoFreeSlot, match="held by another job"):
        a.claim("j2", 1, 100, cpus=[3])
    with pytest.raises(NoFreeSlot, match="keeps from jobs"):
        a.claim("j2", 1, 100, cpus=[9])


def _claim_many(path, worker, results):
    a = SlotAllocator(path, Capacity(tuple(range(8)), 100000), 30)
    for i in range(5):
        try:
            s, _ = a.claim(f"w{worker}-{i}", 1, 10)
            results.put(s.cpus)
        except NoFreeSlot:
            results.put(None)


def test_concurrent_claims_never_overlap(tmp_path):
    results = multiprocessing.Queue()
    procs = [multiprocessing.Process(target=_claim_many, args=(str(tmp_path), w, results))
             for w in range(4)]
    for p in procs:
        p.start()
    got = [results.get(timeout=60) for _ in range(20)]
    for p in procs:
        p.join(timeout=60)
    cpus = [c for r in got if r for c in r]
    assert len(cpus) == 8 and len(set(cpus)) == 8          # all 8 handed out, none twice
    assert got.count(None) == 12
    assert sorted(c for s in alloc(tmp_path, cpus=range(8), mem=100000).all().values()
                  for c in s.cpus) == list(range(8))


def test_lock_timeout_is_named(tmp_path):
    a = alloc(tmp_path, timeout=0.2)
    ctx = multiprocessing.get_context("fork")
    ready, done = ctx.Event(), ctx.Event()

    def hold():
        with filelock.FileLock(os.path.join(str(tmp_path), "slots.lock")):
            ready.set()
            done.wait(30)
    p = ctx.Process(target=hold)
    p.start()
    try:
        assert ready.wait(30)
        with pytest.raises(LockTimeout, match="slots.lock"):
            a.claim("j", 1, 10)
    finally:
        done.set()
        p.join(30)
    assert a.claim("j", 1, 10)[1]
