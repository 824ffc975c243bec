"""serve_app.batching.MicroBatcher: what queues together is answered in one call, in order."""

import asyncio

import pytest

from serve_app.batching import MicroBatcher


class Recorder:
    """A batch function that records the batches it was called with."""

    def __init__(self, fail_on=None):
        self.calls: list[list[int]] = []
        self.fail_on = fail_on

    def __call__(self, items: list[int]) -> list[int]:
        self.calls.append(list(items))
        if self.fail_on is not None and self.fail_on in items:
            raise ValueError(f"bad item {self.fail_on}")
        return [10 * i for i in items]


def test_requests_queued_together_are_one_call_in_order():
    fn = Recorder()
    batcher = MicroBatcher(fn, max_batch_size=16)

    async def main():
        return await asyncio.gather(*(batcher.submit(i) for i in range(5)))

    assert asyncio.run(main()) == [0, 10, 20, 30, 40]
    assert fn.calls == [[0, 1, 2, 3, 4]]
    assert (batcher.batches, batcher.items) == (1, 5)


def test_a_lone_request_is_answered_alone_and_later_ones_form_the_next_batch():
    fn = Recorder()
    batcher = MicroBatcher(fn, max_batch_size=16)

    async def main():
        first = await batcher.submit(1)  # nothing else queued: a batch of one
        rest = await asyncio.gather(*(batcher.submit(i) for i in (2, 3, 4)))
        return first, rest

    assert asyncio.run(main()) == (10, [20, 30, 40])
    assert fn.calls == [[1], [2, 3, 4]]


def test_max_batch_size_splits_a_long_queue():
    fn = Recorder()
    batcher = MicroBatcher(fn, max_batch_size=4)

    async def main():
        return await asyncio.gather(*(batcher.submit(i) for i in range(10)))

    assert asyncio.run(main()) == [10 * i for i in range(10)]
    assert [len(c) for c in fn.calls] == [4, 4, 2]
    assert sum(fn.calls, []) == list(range(10))


@pytest.mark.parametrize("timeout,batches", [(0.0, [[1], [2]]), (0.5, [[1, 2]])])
def test_a_positive_timeout_waits_for_the_next_request(timeout, batches):
    fn = Recorder()
    batcher = MicroBatcher(fn, max_batch_size=8, batch_wait_timeout_s=timeout)

    async def main():
        first = asyncio.ensure_future(batcher.submit(1))
        await asyncio.sleep(0.01)  # the second arrives 10 ms after the first
        return await asyncio.gather(first, batcher.submit(2))

    assert asyncio.run(main()) == [10, 20]
    assert fn.calls == batches


def test_a_full_batch_does_not_wait_for_the_timeout():
    fn = Recorder()
    batcher = MicroBatcher(fn, max_batch_size=3, batch_wait_timeout_s=30.0)

    async def main():
        return await asyncio.wait_for(
            asyncio.gather(*(batcher.submit(i) for i in range(3))), timeout=5)

    assert asyncio.run(main()) == [0, 10, 20]
    assert fn.calls == [[0, 1, 2]]


def test_an_error_reaches_every_caller_of_its_batch_and_the_next_batch_works():
    fn = Recorder(fail_on=2)
    batcher = MicroBatcher(fn, max_batch_size=16)

    async def main():
        failed = await asyncio.gather(*(batcher.submit(i) for i in (1, 2, 3)),
                                      return_exceptions=True)
        return failed, await batcher.submit(5)

    failed, after = asyncio.run(main())
    assert [type(f) for f in failed] == [ValueError] * 3 and "bad item 2" in str(failed[0])
    assert after == 50 and (batcher.batches, batcher.items) == (1, 1)


def test_a_cancelled_caller_is_left_out_of_the_batch():
    fn = Recorder()
    batcher = MicroBatcher(fn, max_batch_size=16)

    async def main():
        tasks = [asyncio.ensure_future(batcher.submit(i)) for i in range(3)]
        await asyncio.sleep(0)  # each task queues its item and awaits
        tasks[1].cancel()
        return await asyncio.gather(*tasks, return_exceptions=True)

    got = asyncio.run(main())
    assert got[0] == 0 and got[2] == 20 and isinstance(got[1], asyncio.CancelledError)
    assert fn.calls == [[0, 2]]


def test_a_cancelled_first_caller_still_gets_its_batch_answered():
    """The first caller flushes its batch itself; cancelled first, it hands the flush on."""
    fn = Recorder()
    batcher = MicroBatcher(fn, max_batch_size=16)

    async def main():
        tasks = [asyncio.ensure_future(batcher.submit(i)) for i in range(3)]
        await asyncio.sleep(0)  # the first yields its turn, the others queue behind it
        tasks[0].cancel()
        got = await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 5)
        return got, await batcher.submit(7)  # and the batcher keeps working

    (first, *rest), after = asyncio.run(main())
    assert isinstance(first, asyncio.CancelledError) and rest == [10, 20] and after == 70
    assert fn.calls == [[1, 2], [7]]


def test_a_wrong_result_count_is_an_error_not_a_misrouted_answer():
    batcher = MicroBatcher(lambda items: items[:-1], max_batch_size=16)

    async def main():
        return await asyncio.gather(*(batcher.submit(i) for i in range(3)),
                                    return_exceptions=True)

    assert all("returned 2 results for 3 items" in str(r) for r in asyncio.run(main()))


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="max_batch_size=0 must be >= 1"):
        MicroBatcher(len, max_batch_size=0)
    with pytest.raises(ValueError, match="batch_wait_timeout_s=-1"):
        MicroBatcher(len, batch_wait_timeout_s=-1)
