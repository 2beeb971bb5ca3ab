"""The engine on its own thread: the asyncio side submits and aborts, and awaits each request's events.

One thread owns the scheduler, the KV memory and the model, so nothing is shared but two queues: commands in, and
events delivered into per-request asyncio queues with `call_soon_threadsafe`. The event loop never waits on torch.
The same thread also loads the model: torch's OpenMP gives every thread that runs parallel ops its own worker team,
and with a second (idle) team on the machine the workers stop spinning between ops and sleep on futexes, which made
CPU denoising steps 1.7-2.3x slower.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Future
from dataclasses import dataclass

from engine.config import EngineConfig
from engine.engine import Engine
from engine.request import EngineDeadError, EngineEvent, EngineInfo, Failed, Finished, Request, StepStats

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class _Listener:
    events: asyncio.Queue[EngineEvent]
    loop: asyncio.AbstractEventLoop


@dataclass(slots=True)
class _Add:
    requests: list[Request]
    listeners: list[_Listener]
    accepted: Future[None]


class RequestStream:
    """A request's events; iterating ends after Finished or Failed. Closing it early aborts the request."""

    def __init__(self, engine: AsyncEngine, request_id: str, events: asyncio.Queue[EngineEvent]) -> None:
        self.request_id, self._engine, self._events, self._done = request_id, engine, events, False

    def __aiter__(self) -> AsyncIterator[EngineEvent]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[EngineEvent]:
        try:
            while not self._done:
                event = await self._events.get()
                self._done = isinstance(event, Finished | Failed)
                yield event
        finally:
            if not self._done:  # the consumer went away (client disconnect, cancellation)
                self._engine.abort(self.request_id)


class AsyncEngine:
    def __init__(self, config: EngineConfig, on_step: Callable[[StepStats], None] | None = None) -> None:
        """Load the model on the engine thread and wait for it; a load error is raised here."""
        self._on_step = on_step
        self._commands: queue.SimpleQueue[_Add | str | None] = queue.SimpleQueue()  # add, abort id, or stop
        self._streams: dict[str, _Listener] = {}
        self._error: BaseException | None = None
        self._stopping = threading.Event()
        self.engine: Engine  # set by the thread before `loaded` resolves
        loaded: Future[None] = Future()
        self._thread = threading.Thread(target=self._run, args=(config, loaded), name="dgserve-engine", daemon=True)
        self._thread.start()
        loaded.result()

    async def add_request(self, request: Request) -> RequestStream:
        """Submit a request; raises InvalidRequestError (bad input) or QueueFullError before any event is
        produced."""
        return (await self.add_requests([request]))[0]

    async def add_requests(self, requests: list[Request]) -> list[RequestStream]:
        """Submit requests together (the choices of one API request): all are queued, or, if one is refused, none
        (Engine.add_requests)."""
        self.check_health()
        loop = asyncio.get_running_loop()
        command = _Add(requests, [_Listener(asyncio.Queue(), loop) for _ in requests], Future())
        self._commands.put(command)
        await asyncio.wrap_future(command.accepted)
        return [RequestStream(self, r.request_id, x.events) for r, x in zip(requests, command.listeners, strict=True)]

    def abort(self, request_id: str) -> None:
        self._commands.put(request_id)

    @property
    def info(self) -> EngineInfo:
        return self.engine.info

    @property
    def num_in_flight(self) -> int:
        """Requests submitted and not yet finished (read from any thread)."""
        return len(self._streams)

    def check_health(self) -> None:
        if self._error is not None or not self._thread.is_alive():
            raise EngineDeadError("the engine thread has stopped") from self._error

    def shutdown(self, timeout: float | None = None) -> None:
        """Stop after the current iteration; requests still in flight get a Failed event."""
        self._stopping.set()
        self._commands.put(None)
        self._thread.join(timeout)

    def _run(self, config: EngineConfig, loaded: Future[None]) -> None:
        try:
            self.engine = Engine(config)
        except BaseException as exc:
            loaded.set_exception(exc)
            return
        loaded.set_result(None)
        try:
            while not self._stopping.is_set():
                self._apply_commands(block=not self.engine.has_unfinished())
                if self.engine.has_unfinished() and not self._stopping.is_set():
                    self._step()
        except BaseException as exc:  # the thread must report why it died, whatever it was
            logger.exception("engine thread died")
            self._error = exc
        finally:
            self._fail_all("the engine stopped" if self._error is None else "the engine failed")

    def _apply_commands(self, block: bool) -> None:
        """Apply every queued command; wait briefly for one when there is nothing to step."""
        try:
            command = self._commands.get(timeout=0.5) if block else self._commands.get_nowait()
            while True:
                if isinstance(command, _Add):
                    self._add(command)
                elif isinstance(command, str):
                    self._streams.pop(command, None)  # nobody listens any more
                    self.engine.abort(command)
                command = self._commands.get_nowait()
        except queue.Empty:
            return

    def _add(self, command: _Add) -> None:
        try:
            self.engine.add_requests(command.requests)
        except Exception as exc:  # ValueError or QueueFullError, handed to the caller's await
            command.accepted.set_exception(exc)
            return
        for request, listener in zip(command.requests, command.listeners, strict=True):
            self._streams[request.request_id] = listener
        command.accepted.set_result(None)

    def _step(self) -> None:
        try:
            events, stats = self.engine.step()
        except RuntimeError as exc:  # a failed forward (torch errors, out of memory): fail what ran, keep serving
            logger.exception("engine step failed; failing the running requests")
            for event in self.engine.fail_running(f"engine error: {type(exc).__name__}"):
                self._deliver(event)
            return
        for event in events:
            self._deliver(event)
        if self._on_step is not None:
            self._on_step(stats)

    def _deliver(self, event: EngineEvent) -> None:
        listener = self._streams.get(event.request_id)
        if listener is None:
            return
        if isinstance(event, Finished | Failed):
            del self._streams[event.request_id]
        try:
            listener.loop.call_soon_threadsafe(listener.events.put_nowait, event)
        except RuntimeError:  # the caller's event loop is closed: nobody is listening
            self._streams.pop(event.request_id, None)

    def _fail_all(self, error: str) -> None:
        for request_id in list(self._streams):
            self._deliver(Failed(request_id, error))
