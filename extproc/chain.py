"""The plugin chain: plugins by priority, each under its deadline, breaker and failure policy.

A :class:`Chain` is immutable (a tuple of :class:`Slot`, precomputed per phase) and replaced
whole on reload, so running it needs no lock. :meth:`Chain.run` takes one event and gives one
:class:`Outcome`: the merged mutations of every plugin that said *continue*, or the first
*respond* / *reject*. It never raises because of a plugin.
"""

from __future__ import annotations

import asyncio
import logging
import time
import types
from collections.abc import Coroutine, Generator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, cast

from extproc.context import _deadline
from extproc.deadlines import STALL_TOLERANCE, loop_deadlines
from extproc.observability.metrics import BoundCounter, BoundHistogram, Registry
from extproc.observability.tracing import current_stream
from extproc.plugin import (
    _REQUEST_PHASES,
    CONTINUE,
    BodyMode,
    Continue,
    ErrorEvent,
    ErrorKind,
    Event,
    Needs,
    Phase,
    Plugin,
    Reject,
    Respond,
)
from extproc.rollout import Gate
from extproc.services.breaker import CircuitBreaker

__all__ = ["STALL_TOLERANCE", "Chain", "Outcome", "Slot"]

log = logging.getLogger("extproc.chain")

_RESULT_TYPES: Final = (Continue, Respond, Reject)


@dataclass(slots=True)
class _SlotMetrics:
    """Counters and histograms of one slot, bound once per phase at build time."""

    duration: dict[Phase, BoundHistogram]
    results: dict[tuple[Phase, str], BoundCounter]
    errors: dict[str, BoundCounter]


@dataclass(slots=True)
class Slot:
    """One configured plugin instance in a chain."""

    plugin: Plugin
    name: str
    priority: int
    timeout: float
    fail_open: bool
    breaker: CircuitBreaker
    shadow: bool = False
    phases: frozenset[Phase] = frozenset()
    #: None: runs for every request; else decides per request (rollout)
    gate: Gate | None = None
    #: what the plugin declared for its configuration (``Plugin.needs_for``)
    needs: Needs = field(default_factory=Needs)
    #: run each call in a task of its own (a hard deadline); False for plugins that declare
    #: ``cancellation_safe`` (cheaper: no task, and no timer when the hook does not wait)
    isolate: bool = True

    def __post_init__(self) -> None:
        if not self.phases:
            self.phases = self.needs.phases()

    metrics: _SlotMetrics | None = None

    @property
    def request_body(self) -> BodyMode:
        return self.needs.request_body

    @property
    def response_body(self) -> BodyMode:
        return self.needs.response_body


@dataclass(slots=True)
class Outcome:
    """What the chain decided for one message.

    ``respond`` is set when a plugin answered the client; otherwise the merged mutations:
    ``set_headers`` (key -> value; a later set replaces an earlier one), ``append_headers``,
    ``remove_headers``, a replacement ``body`` and dynamic ``metadata`` by namespace.
    """

    respond: Respond | None = None
    responder: str = ""
    set_headers: dict[str, str] = field(default_factory=dict)
    append_headers: list[tuple[str, str]] = field(default_factory=list)
    remove_headers: list[str] = field(default_factory=list)
    body: bytes | None = None
    metadata: dict[str, dict[str, Any]] = field(default_factory=dict)

    def merge(self, plugin: str, result: Continue) -> None:
        for key in result.remove_headers:
            k = key.lower()
            self.set_headers.pop(k, None)
            self.append_headers = [(a, v) for a, v in self.append_headers if a != k]
            self.remove_headers.append(k)
        for key, value in result.set_headers.items():
            k = key.lower()
            self.set_headers[k] = value
            if self.append_headers:
                self.append_headers = [(a, v) for a, v in self.append_headers if a != k]
            if k in self.remove_headers:  # an overwrite replaces every earlier value anyway
                self.remove_headers.remove(k)
        pairs = result.append_headers
        if pairs:  # dict first: an ABC check costs several times more, on every request
            items = pairs.items() if isinstance(pairs, dict | Mapping) else pairs
            for key, value in items:
                self.append_headers.append((key.lower(), value))
        if result.body is not None:
            self.body = result.body
        if result.metadata:
            self.metadata[f"extproc.{plugin}"] = dict(result.metadata)

    @property
    def is_noop(self) -> bool:
        return not (
            self.respond
            or self.set_headers
            or self.append_headers
            or self.remove_headers
            or self.body is not None
            or self.metadata
        )


def _retrieve(task: asyncio.Future[Any]) -> None:
    """Consume the outcome of an abandoned hook so asyncio does not report it as lost."""
    if not task.cancelled():
        task.exception()


@types.coroutine
def _resume(coro: Coroutine[Any, Any, Any], pending: Any) -> Generator[Any, Any, Any]:
    """Go on driving ``coro`` (which has already yielded ``pending``) in the current task,
    exactly as ``await`` would: values and exceptions (cancellation included) pass through."""
    while True:
        try:
            value = yield pending
        except GeneratorExit:
            coro.close()
            raise
        except BaseException as exc:  # thrown in by the event loop, cancellation included
            try:
                pending = coro.throw(exc)
            except StopIteration as stop:
                return stop.value
        else:
            try:
                pending = coro.send(value)
            except StopIteration as stop:
                return stop.value


def _result_name(result: Continue | Respond | Reject) -> str:
    if isinstance(result, Continue):
        return "continue"
    return "reject" if isinstance(result, Reject) else "respond"


class Chain:
    """An immutable, priority-ordered tuple of plugin slots."""

    def __init__(self, slots: Sequence[Slot], *, budget: float, registry: Registry) -> None:
        ordered = sorted(slots, key=lambda s: -s.priority)
        self.slots: tuple[Slot, ...] = tuple(ordered)
        self.budget = budget
        self.by_phase: dict[Phase, tuple[Slot, ...]] = {
            phase: tuple(s for s in self.slots if phase in s.phases) for phase in Phase
        }
        #: the phases some plugin runs in (a stream ends once none of them can still come)
        self.wanted: frozenset[Phase] = frozenset(p for p, s in self.by_phase.items() if s)
        duration = registry.histogram(
            "extproc_plugin_duration_seconds", "time in a plugin hook", ("plugin", "phase")
        )
        results = registry.counter(
            "extproc_plugin_decisions_total", "plugin results", ("plugin", "phase", "result")
        )
        errors = registry.counter(
            "extproc_plugin_errors_total", "plugin failures by kind", ("plugin", "kind")
        )
        for slot in self.slots:
            slot.metrics = _SlotMetrics(
                duration={p: duration.labels(slot.name, p.value) for p in slot.phases},
                results={
                    (p, r): results.labels(slot.name, p.value, r)
                    for p in slot.phases
                    for r in ("continue", "respond", "reject", "failed", "shadow_deny")
                },
                errors={
                    k: errors.labels(slot.name, k)
                    for k in ("exception", "timeout", "breaker_open", "bad_result")
                },
            )
        self._background: set[asyncio.Task[None]] = set()

    def wants(self, phase: Phase) -> bool:
        return bool(self.by_phase[phase])

    async def run(
        self, event: Event, slots: tuple[Slot, ...] | None = None, started: float | None = None
    ) -> Outcome:
        """Run the plugins of ``event.phase`` (or ``slots``) within one message budget."""
        phase = event.phase
        loop = asyncio.get_running_loop()
        now = loop.time()
        message_deadline = (started if started is not None else now) + self.budget
        outcome = Outcome()
        span = current_stream()
        for slot in self.by_phase[phase] if slots is None else slots:
            if slot.gate is not None and not slot.gate(event.request, event.context):
                continue
            if span is None:
                result = await self._call(slot, event, loop, message_deadline)
            else:
                with span.plugin_span(slot.name, phase.value) as call:
                    result = await self._call(slot, event, loop, message_deadline)
                    call.set_result(_result_name(result))
            metrics = slot.metrics
            if type(result) is Continue:
                if metrics:
                    metrics.results[(phase, "continue")].inc()
                if not result.is_noop and not slot.shadow:
                    outcome.merge(slot.name, result)
                continue
            respond = result.to_respond() if isinstance(result, Reject) else cast(Respond, result)
            if slot.shadow:
                if metrics:
                    metrics.results[(phase, "shadow_deny")].inc()
                log.info(
                    "shadow plugin would have answered",
                    extra={"plugin": slot.name, "phase": phase.value, "status": respond.status},
                )
                continue
            if metrics:
                kind = "reject" if isinstance(result, Reject) else "respond"
                metrics.results[(phase, kind)].inc()
            outcome.respond = respond
            outcome.responder = slot.name
            return outcome
        return outcome

    async def _call(
        self, slot: Slot, event: Event, loop: asyncio.AbstractEventLoop, message_deadline: float
    ) -> Continue | Respond | Reject:
        if not slot.breaker.allow():
            return self._failed(slot, event, "breaker_open", None)
        deadline = loop.time() + slot.timeout
        deadline = min(deadline, message_deadline)
        hook = slot.plugin.on_request if event.phase in _REQUEST_PHASES else slot.plugin.on_response
        token = _deadline.set(deadline)
        t0 = time.perf_counter()
        try:
            coro = hook(event)  # type: ignore[arg-type]
            if slot.isolate:
                result = await self._isolated(slot, coro, loop, deadline, message_deadline)
            else:
                # Most hooks finish without waiting for anything (a cache hit, a header
                # rule): their first step returns, and no timer is armed at all. A hook that
                # suspends goes on in this task, its deadline kept by the loop's one timer
                # (extproc.deadlines) instead of a timer and an asyncio.timeout per call.
                try:
                    pending = coro.send(None)
                except StopIteration as stop:
                    result = stop.value
                else:
                    with loop_deadlines(loop).timeout(deadline, limit=message_deadline):
                        result = await _resume(coro, pending)
        except TimeoutError as exc:
            return self._failed(slot, event, "timeout", exc)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            return self._failed(slot, event, "exception", exc)
        finally:
            _deadline.reset(token)
            if slot.metrics:
                slot.metrics.duration[event.phase].observe(time.perf_counter() - t0)
        if not isinstance(result, _RESULT_TYPES):
            error = TypeError(
                f"plugin {slot.name!r} returned {type(result).__name__} from "
                f"{hook.__name__}; return extproc.plugin.CONTINUE, Continue(...), "
                f"Respond(...) or Reject(...)"
            )
            return self._failed(slot, event, "bad_result", error)
        slot.breaker.record_success()
        return result

    async def _isolated(
        self,
        slot: Slot,
        coro: Coroutine[Any, Any, Any],
        loop: asyncio.AbstractEventLoop,
        deadline: float,
        limit: float,
    ) -> Any:
        """Run the hook in a task of its own with a hard deadline: when it passes, the chain
        moves on (failure policy) even if the hook delays or ignores its cancellation; the
        task is cancelled and kept until it ends."""
        task = loop.create_task(coro)
        waiter = loop.create_future()

        def wake(_: object = None) -> None:
            if not waiter.done():
                waiter.set_result(None)

        task.add_done_callback(wake)
        timer = loop_deadlines(loop).at(deadline, wake, limit=limit, task=task)
        try:
            await waiter
        except asyncio.CancelledError:
            task.cancel()
            raise
        finally:
            timer.cancel()
        if task.done():
            return task.result()
        task.cancel()
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        task.add_done_callback(_retrieve)
        log.warning("plugin still running after its deadline; cancelled",
                    extra={"plugin": slot.name})  # fmt: skip
        raise TimeoutError

    def _failed(
        self, slot: Slot, event: Event, kind: ErrorKind, error: BaseException | None
    ) -> Continue | Respond | Reject:
        if kind != "breaker_open":
            slot.breaker.record_failure()
        if slot.metrics:
            slot.metrics.errors[kind].inc()
            slot.metrics.results[(event.phase, "failed")].inc()
        log.warning(
            "plugin failed: %s",
            kind,
            extra={
                "plugin": slot.name,
                "phase": event.phase.value,
                "error": repr(error) if error is not None else None,
                "policy": "open" if slot.fail_open else "closed",
                "request_id": event.request.request_id,
            },
            exc_info=error if kind == "exception" else None,
        )
        err_event = ErrorEvent(event.phase, kind, error, event.request, event.context)
        task = asyncio.ensure_future(self._notify(slot, err_event))
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        if slot.fail_open or slot.shadow:
            return CONTINUE
        if kind in ("timeout", "breaker_open"):
            return Reject(
                503, "unavailable", "The request could not be processed.",
                details=f"extproc_{slot.name}_{kind}",
            )  # fmt: skip
        return Reject(
            500, "internal_error", "The request could not be processed.",
            details=f"extproc_{slot.name}_{kind}",
        )  # fmt: skip

    async def _notify(self, slot: Slot, event: ErrorEvent) -> None:
        try:
            async with asyncio.timeout(max(slot.timeout, 0.1)):
                await slot.plugin.on_error(event)
        except Exception:
            log.exception("on_error failed", extra={"plugin": slot.name})

    def plugins(self) -> Mapping[str, Plugin]:
        return {s.name: s.plugin for s in self.slots}
