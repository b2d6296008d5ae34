"""Plugin deadlines against a worker that stalls: the time the loop could not run is given
back to the plugin (within the message budget); a plugin that is slow on its own still times
out on time. Both ways of running a hook: in a task of its own (isolated) and inline."""

from __future__ import annotations

import asyncio
import gc
import time

import pytest

from extproc.chain import STALL_TOLERANCE, Chain, Slot
from extproc.deadlines import loop_deadlines
from extproc.observability.metrics import Registry
from extproc.plugin import CONTINUE, Continue, Plugin, Reject, RequestEvent, Result
from extproc.services.breaker import CircuitBreaker
from extproc.testing.events import request_headers
from tests.unit.test_deadlines import answered_while_busy


class Sleeper(Plugin):
    """Waits twice (two round trips, say): after a stall it still has work to do."""

    name = "sleeper"

    def __init__(self, seconds: float) -> None:
        super().__init__(None)
        self.seconds = seconds

    async def on_request(self, event: RequestEvent) -> Result:
        await asyncio.sleep(self.seconds)
        await asyncio.sleep(self.seconds)
        return CONTINUE


def chain(plugin: Plugin, *, isolate: bool, timeout: float, budget: float) -> Chain:
    slot = Slot(
        plugin=plugin,
        name=plugin.name,
        priority=0,
        timeout=timeout,
        fail_open=False,
        breaker=CircuitBreaker("plugin:sleeper", failure_threshold=1000),
        isolate=isolate,
    )
    return Chain([slot], budget=budget, registry=Registry())


def block_loop_soon(seconds: float) -> None:
    """Freeze the event loop (as a GC pause or a starved CPU would) one tick from now."""
    asyncio.get_running_loop().call_soon(time.sleep, seconds)


@pytest.mark.parametrize("isolate", [True, False], ids=["isolated", "inline"])
async def test_a_stalled_loop_does_not_time_the_plugin_out(isolate: bool) -> None:
    c = chain(Sleeper(0.01), isolate=isolate, timeout=0.05, budget=1.0)
    block_loop_soon(0.15)  # the 50 ms deadline passes while nothing can run
    outcome = await c.run(request_headers())
    assert outcome.respond is None  # the plugin finished: no 503


@pytest.mark.parametrize("isolate", [True, False], ids=["isolated", "inline"])
async def test_a_slow_plugin_still_times_out_on_time(isolate: bool) -> None:
    c = chain(Sleeper(5.0), isolate=isolate, timeout=0.05, budget=1.0)
    loop = asyncio.get_running_loop()
    started = loop.time()
    outcome = await c.run(request_headers())
    assert outcome.respond is not None and outcome.respond.status == 503
    assert loop.time() - started < 0.05 + STALL_TOLERANCE + 0.2


@pytest.mark.parametrize("isolate", [True, False], ids=["isolated", "inline"])
async def test_the_time_given_back_never_passes_the_message_budget(isolate: bool) -> None:
    c = chain(Sleeper(5.0), isolate=isolate, timeout=0.05, budget=0.1)
    loop = asyncio.get_running_loop()
    started = loop.time()
    block_loop_soon(0.3)  # past the whole message budget
    outcome = await c.run(request_headers())
    assert outcome.respond is not None and outcome.respond.status == 503
    assert loop.time() - started < 0.3 + 0.2  # expired at once after the stall, not 0.3 later


class Decides(Plugin):
    """Answers as soon as its own (earlier) timer fires, as the rate limiter's fallback does."""

    name = "decides"

    async def on_request(self, event: RequestEvent) -> Result:
        try:
            async with asyncio.timeout(0.02):
                await asyncio.sleep(5.0)
        except TimeoutError:
            await asyncio.sleep(0.005)  # a fallback that itself takes a moment
            return Reject(429, "fallback", "decided by the plugin's own deadline")
        return Continue()


@pytest.mark.parametrize("isolate", [True, False], ids=["isolated", "inline"])
async def test_after_a_stall_the_plugins_own_deadline_wins(isolate: bool) -> None:
    c = chain(Decides(None), isolate=isolate, timeout=0.05, budget=1.0)
    block_loop_soon(0.15)  # both deadlines pass during the stall
    outcome = await c.run(request_headers())
    assert outcome.respond is not None and outcome.respond.status == 429


# ---------------------------------------------------------------- the shared deadline timer


async def test_finished_calls_leave_the_deadline_heap_when_the_timer_next_fires() -> None:
    c = chain(Sleeper(0), timeout=0.05, budget=1.0, isolate=False)  # waits, briefly
    for _ in range(200):
        assert (await c.run(request_headers())).respond is None
    deadlines = loop_deadlines()
    assert 0 < len(deadlines) <= 200  # only marked done so far
    await asyncio.sleep(0.05 + 0.05)
    assert len(deadlines) == 0  # one timer firing swept them all


async def test_an_earlier_deadline_arriving_later_is_still_kept() -> None:
    """The shared timer is armed for a late deadline; a call with an earlier one re-arms it."""
    c = chain(Sleeper(5.0), timeout=1.0, budget=2.0, isolate=False)
    loop = asyncio.get_running_loop()
    slow = asyncio.ensure_future(c.run(request_headers()))  # deadline in 1 s
    await asyncio.sleep(0.01)
    started = loop.time()
    # the same plugin, with only 50 ms of its message budget left
    outcome = await c.run(request_headers(), started=started - 2.0 + 0.05)
    assert outcome.respond is not None and outcome.respond.status == 503
    assert loop.time() - started < 0.05 + STALL_TOLERANCE + 0.2
    slow.cancel()
    with pytest.raises(asyncio.CancelledError):
        await slow


async def test_cancelling_the_stream_is_not_turned_into_a_timeout() -> None:
    c = chain(Sleeper(5.0), timeout=1.0, budget=2.0, isolate=False)
    run = asyncio.ensure_future(c.run(request_headers()))
    await asyncio.sleep(0.01)
    run.cancel()  # the stream ended (Envoy reset it): the hook's wait is cancelled
    with pytest.raises(asyncio.CancelledError):
        await run


class Stubborn(Plugin):
    """Swallows its cancellation once and answers anyway."""

    name = "stubborn"

    async def on_request(self, event: RequestEvent) -> Result:
        try:
            await asyncio.sleep(5.0)
        except asyncio.CancelledError:
            return Continue(set_headers={"x-late": "1"})
        return CONTINUE


async def test_a_hook_that_swallows_its_deadline_leaves_the_task_uncancelled() -> None:
    c = chain(Stubborn(None), timeout=0.05, budget=1.0, isolate=False)
    outcome = await c.run(request_headers())
    assert outcome.set_headers == {"x-late": "1"}  # its answer stands, as under asyncio.timeout
    task = asyncio.current_task()
    assert task is not None and task.cancelling() == 0  # no cancellation left pending
    await asyncio.sleep(0)  # and none is delivered later


class Answered(Plugin):
    """Its dependency answers 2 ms before the hook's deadline, but the worker is busy with
    other requests (a 15 ms callback) and resumes the hook only after the deadline."""

    name = "answered"

    async def on_request(self, event: RequestEvent) -> Result:
        await answered_while_busy(None)
        return CONTINUE


@pytest.mark.parametrize("isolate", [True, False], ids=["isolated", "inline"])
async def test_a_dependency_that_answered_in_time_is_not_a_timeout(isolate: bool) -> None:
    """The deadline (10 ms) comes 7 ms late - under the stall tolerance - and finds the hook's
    wait over: it waits for the loop, not for its dependency, so it is not cut."""
    c = chain(Answered(None), isolate=isolate, timeout=0.010, budget=1.0)
    outcome = await c.run(request_headers())
    assert outcome.respond is None


class FailsAsTheStreamEnds(Plugin):
    """Fails just as Envoy resets the stream: the chain's run is cancelled before it wakes to
    read the failure."""

    name = "fails-as-the-stream-ends"
    runner: asyncio.Task[object] | None = None

    async def on_request(self, event: RequestEvent) -> Result:
        assert self.runner is not None
        self.runner.cancel()
        raise RuntimeError("boom")


async def test_a_hook_that_failed_as_the_stream_was_cancelled_is_not_logged_by_asyncio() -> None:
    """asyncio logs an unread task failure ("Task exception was never retrieved", with the
    plugin's traceback) when the task is freed. Nobody reads this one; the chain's
    ``task.cancel()`` on the finished task is what clears asyncio's flag (the cache had no
    such call and logged: tests/unit/services/test_cache.py)."""
    plugin = FailsAsTheStreamEnds(None)
    c = chain(plugin, isolate=True, timeout=0.05, budget=1.0)
    loop = asyncio.get_running_loop()
    logged: list[dict[str, object]] = []
    loop.set_exception_handler(lambda _loop, context: logged.append(context))
    try:
        plugin.runner = run = loop.create_task(c.run(request_headers()))
        with pytest.raises(asyncio.CancelledError):
            await run
        await asyncio.sleep(0.1)  # past the deadline: its timer lets go of the hook's task
        del run  # and so does the cancelled run's traceback
        plugin.runner = None
        gc.collect()
        assert logged == []
    finally:
        loop.set_exception_handler(None)
