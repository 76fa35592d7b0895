"""Group commit: merging, bounds, and what callers see when a flush fails."""

from __future__ import annotations

import asyncio

import pytest

from onecard.ledger.batcher import GroupCommitter, ItemsHeld, Overloaded, ShuttingDown


async def test_groups_merge_but_never_split_and_results_align() -> None:
    gate = asyncio.Event()
    flushed: list[list[int]] = []

    async def flush(items: list[int]) -> list[int]:
        await gate.wait()
        flushed.append(items)
        return [i * 10 for i in items]

    gc: GroupCommitter[int, int] = GroupCommitter(flush, max_batch=5, max_queue=100)
    gc.start()
    first = asyncio.create_task(gc.submit(0))  # occupies the flusher
    await asyncio.sleep(0)
    groups = [[1, 2], [3, 4, 5], [6], [7, 8, 9, 10, 11, 12]]
    tasks = [asyncio.create_task(gc.submit_many(g)) for g in groups]
    await asyncio.sleep(0)
    gate.set()
    assert await first == 0
    assert [await t for t in tasks] == [[i * 10 for i in g] for g in groups]
    # [1,2]+[3,4,5] fill a batch of 5; [6] goes alone (the next group would overflow);
    # a group larger than max_batch is one batch of its own.
    assert flushed == [[0], [1, 2, 3, 4, 5], [6], [7, 8, 9, 10, 11, 12]]
    await gc.close()


async def test_full_queue_refuses_at_once() -> None:
    gate = asyncio.Event()

    async def flush(items: list[int]) -> list[int]:
        await gate.wait()
        return items

    gc: GroupCommitter[int, int] = GroupCommitter(flush, max_batch=10, max_queue=3)
    gc.start()
    busy = asyncio.create_task(gc.submit(0))
    await asyncio.sleep(0)
    waiting = [asyncio.create_task(gc.submit(i)) for i in (1, 2, 3)]
    await asyncio.sleep(0)
    with pytest.raises(Overloaded, match="3 requests waiting"):
        await gc.submit(4)
    gate.set()
    assert await busy == 0
    assert [await t for t in waiting] == [1, 2, 3]
    await gc.close()


async def test_a_failed_flush_fails_its_callers_and_the_next_batch_goes_on() -> None:
    calls = 0

    async def flush(items: list[int]) -> list[int]:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise ConnectionError("database went away")
        return items

    gc: GroupCommitter[int, int] = GroupCommitter(flush)
    gc.start()
    with pytest.raises(ConnectionError):
        await gc.submit_many([1, 2])
    assert await gc.submit(3) == 3
    await gc.close()
    with pytest.raises(ShuttingDown):
        await gc.submit(4)  # closed: refuses instead of hanging, and not as "queue full"


async def test_a_failing_flush_recorder_answers_the_batch_and_flushing_goes_on() -> None:
    """The recorder (metrics) runs after COMMIT: its failure must not strand callers.

    It used to run before the replies were set and outside any guard: a
    metrics write that failed (a full disk) ended the only flusher, the
    committed batch was never answered and every later call waited.
    """

    async def flush(items: list[int]) -> list[int]:
        return [i * 10 for i in items]

    def record(name: str, items: int, seconds: float) -> None:
        raise OSError("No space left on device")

    gc: GroupCommitter[int, int] = GroupCommitter(flush, on_flush=record)
    gc.start()
    assert await asyncio.wait_for(gc.submit_many([1, 2]), 5) == [10, 20]
    assert await asyncio.wait_for(gc.submit(3), 5) == 30
    await gc.close()


async def test_check_room_applies_the_submit_rule_without_queueing() -> None:
    """Callers with work to do before submitting (uploads) ask first; asking takes no place."""
    gate = asyncio.Event()

    async def flush(items: list[int]) -> list[int]:
        await gate.wait()
        return items

    gc: GroupCommitter[int, int] = GroupCommitter(flush, max_batch=10, max_queue=3)
    gc.check_room(50)  # an empty queue takes any group, however large
    gc.start()
    busy = asyncio.create_task(gc.submit(0))
    await asyncio.sleep(0)
    waiting = asyncio.create_task(gc.submit_many([1, 2]))
    await asyncio.sleep(0)
    gc.check_room(1)  # 2 + 1 fit in 3
    assert len(gc) == 2
    with pytest.raises(Overloaded, match="3 requests waiting"):
        gc.check_room(2)
    gate.set()
    assert await busy == 0
    assert await waiting == [1, 2]
    await gc.close()
    with pytest.raises(ShuttingDown):
        gc.check_room(1)  # closing: refused like a submission


async def test_a_caller_that_has_gone_is_not_flushed() -> None:
    """A caller cancelled while it waited (its deadline passed) was told nothing was done.

    Its work used to be committed anyway, after the caller had been answered
    DEADLINE_EXCEEDED: the database spent on replies nobody reads, most of
    all under the overload that made callers time out.
    """
    gate = asyncio.Event()
    flushed: list[list[int]] = []

    async def flush(items: list[int]) -> list[int]:
        flushed.append(items)
        await gate.wait()
        return items

    gc: GroupCommitter[int, int] = GroupCommitter(flush)
    gc.start()
    first = asyncio.create_task(gc.submit(1))
    await asyncio.sleep(0)
    await asyncio.sleep(0)  # the flusher holds [1] and waits at the gate
    gone = asyncio.create_task(gc.submit_many([2, 3]))
    kept = asyncio.create_task(gc.submit(4))
    await asyncio.sleep(0)
    gone.cancel()
    await asyncio.sleep(0)
    assert len(gc) == 3  # counted until a flusher drops it
    gate.set()
    assert await first == 1 and await kept == 4
    assert flushed == [[1], [4]]
    assert len(gc) == 0
    await gc.close()


class _Odd(ItemsHeld):
    """Holds the odd items, as CardsHeld holds a held card's requests."""

    def holds(self, item: object) -> bool:
        return isinstance(item, int) and item % 2 == 1


async def test_items_held_fail_their_groups_and_the_others_flush_again() -> None:
    gate = asyncio.Event()
    flushed: list[list[int]] = []

    async def flush(items: list[int]) -> list[int]:
        await gate.wait()
        flushed.append(items)
        if any(i % 2 for i in items):
            raise _Odd("held")
        return [i * 10 for i in items]

    gc: GroupCommitter[int, int] = GroupCommitter(flush, max_batch=10, max_queue=100)
    gc.start()
    groups = [[2], [4, 5], [6, 8], [7]]
    tasks = [asyncio.create_task(gc.submit_many(g)) for g in groups]
    await asyncio.sleep(0)
    gate.set()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    assert results[0] == [20]
    assert isinstance(results[1], _Odd)  # a group commits whole: [4, 5] fails with 5
    assert results[2] == [60, 80]
    assert isinstance(results[3], _Odd)
    assert flushed == [[2, 4, 5, 6, 8, 7], [2, 6, 8]]
    await gc.close()


async def test_items_held_that_name_nothing_of_the_batch_fail_it_whole() -> None:
    """No loop: a flush that names none of its items as held is a plain failure."""
    flushes = 0

    async def flush(items: list[int]) -> list[int]:
        nonlocal flushes
        flushes += 1
        raise _Odd("held elsewhere")

    gc: GroupCommitter[int, int] = GroupCommitter(flush, max_batch=10, max_queue=100)
    gc.start()
    tasks = [asyncio.create_task(gc.submit(i)) for i in (2, 4)]
    results = await asyncio.gather(*tasks, return_exceptions=True)
    assert all(isinstance(r, _Odd) for r in results)
    assert flushes == 1
    await gc.close()


async def test_an_abandoned_close_tells_every_waiting_caller_to_retry() -> None:
    """A close that cannot wait any longer for a database that does not answer fails the
    queued callers at once and those of the flush in flight when it fails, each with
    ShuttingDown (UNAVAILABLE), never with a result.

    A close waited for the flush in flight without bound: a stop of the server hung
    for ever on a database that had stopped answering (found by review).
    """
    silent = asyncio.Event()

    async def flush(items: list[int]) -> list[int]:
        await silent.wait()  # a database that does not answer ...
        raise ConnectionResetError("connection terminated")  # ... until cut off

    gc: GroupCommitter[int, int] = GroupCommitter(flush, max_batch=1, max_queue=10)
    gc.start()
    in_flight = asyncio.create_task(gc.submit(1))
    await asyncio.sleep(0)
    queued = asyncio.create_task(gc.submit(2))
    await asyncio.sleep(0)
    closing = asyncio.create_task(gc.close())
    await asyncio.sleep(0.05)
    assert not closing.done()
    assert gc.abandon() == (1, 1)
    with pytest.raises(ShuttingDown):
        await queued
    silent.set()
    with pytest.raises(ShuttingDown):
        await in_flight
    await asyncio.wait_for(closing, 10)
    with pytest.raises(ShuttingDown):
        await gc.submit(3)


async def test_a_flush_cancelled_by_a_stop_tells_its_callers_to_retry() -> None:
    """A flusher cancelled mid-flush (whether it committed is unknown) fails its callers
    with ShuttingDown: they were left waiting for ever (found by review)."""

    async def flush(items: list[int]) -> list[int]:
        await asyncio.Event().wait()
        return items

    gc: GroupCommitter[int, int] = GroupCommitter(flush)
    gc.start()
    waiting = asyncio.create_task(gc.submit(1))
    await asyncio.sleep(0.01)
    closing = asyncio.create_task(gc.close())
    await asyncio.sleep(0.01)
    closing.cancel()
    with pytest.raises(ShuttingDown):
        await asyncio.wait_for(waiting, 10)
