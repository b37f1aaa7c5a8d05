"""The node's receiving processes: the Storage SCP runs in ``network.receive_processes`` processes that all accept
from one listening socket.

Why processes: pynetdicom runs two polling threads per association (the DUL reactor and the association reactor,
each waking every millisecond) plus the receive work, all under one interpreter lock. With ten associations at once
a single process spends its time passing the lock around and takes fewer instances per second than with one
(docs/benchmarks.md, "Receive under load"); spread over processes the same work scales with the cores.

The main process binds the port (so a port in use is one clear start-up error, and a second node cannot join the
port as it could with SO_REUSEPORT) and spawns the receivers, each handed the socket; once every one has built its
receive path it listens, and the receivers start accepting: the port opens only when the node can take instances.
A receiver that dies is replaced; its association slots are freed (the sender of an instance it had not
acknowledged sends it again). Receivers end with the node even when it is killed (PR_SET_PDEATHSIG), at once,
and on their own when they find themselves handed to init.
"""

from __future__ import annotations

import ctypes
import logging
import multiprocessing
import os
import queue
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import wait
from multiprocessing.context import SpawnProcess
from typing import Any

from dicom_node.network.slots import AssociationSlots

log = logging.getLogger(__name__)

# Connections waiting to be accepted; socketserver's default of 5 makes simultaneous senders retry their SYN.
_BACKLOG = 128
_RESPAWN_DELAY_SECONDS = 1.0


class Flag:
    """A flag the node sets once and its receiving processes poll: a shared byte, read without a lock.

    Not a multiprocessing Event: reading or waiting on one takes a lock shared with the node, and a node that dies
    while it holds that lock (in ``Event.set``, which waits for the woken waiters) leaves every receiver blocked on
    it for good, where neither the stop nor the parent-death signal reaches its loop: the receivers outlived the
    node (tests/test_receive_concurrency.py)."""

    def __init__(self, context: Any) -> None:
        self._value = context.RawValue(ctypes.c_bool, False)

    def set(self) -> None:
        self._value.value = True

    def is_set(self) -> bool:
        return bool(self._value.value)


@dataclass(frozen=True)
class ReceiverContext:
    """What one receiving process is given: its index, the listening socket, the node-wide association slots, the
    queue on which it reports ("ready" or "failed", index, detail), the flag that tells it to start accepting
    (the socket listens) and the one that tells it to stop, and the node's process id."""

    index: int
    listening: socket.socket
    slots: AssociationSlots
    reports: Any  # multiprocessing Queue
    go: Flag
    stop: Flag
    parent_pid: int

    def node_gone(self) -> bool:
        """The node ended without a word (this process was handed to init): the parent-death signal follows the
        thread that started a process, so it is not the only guard."""
        return os.getppid() != self.parent_pid


# The body of a receiving process: builds its receive path on the context and serves until ``context.stop``.
ReceiverTarget = Callable[[Any, ReceiverContext], None]


class ReceiverStartError(OSError):
    """A receiving process could not start (its reason is the message); an OSError, so ``serve`` reports it as the
    one-line start-up error it gives for a port in use."""


class ReceivingProcesses:
    """Service of ``serve``: listens on ``address`` and runs ``count`` receiving processes, each
    ``target(settings, context)``."""

    def __init__(
        self,
        address: tuple[str, int],
        count: int,
        max_associations: int,
        target: ReceiverTarget,
        settings: Any,
        start_timeout: float = 120.0,
        stop_timeout: float = 30.0,
    ) -> None:
        self.address = address
        self.count = count
        self.target = target
        self.settings = settings
        self.start_timeout = start_timeout
        self.stop_timeout = stop_timeout
        self._mp = multiprocessing.get_context("spawn")  # a fresh interpreter: the node's threads are not forked
        self.slots = AssociationSlots(max_associations, count, self._mp)
        self._go = Flag(self._mp)
        self._stop = Flag(self._mp)
        self._reports: Any = self._mp.Queue()
        self._socket: socket.socket | None = None
        self._processes: dict[int, SpawnProcess] = {}
        self._stopping = threading.Event()
        self._supervisor: threading.Thread | None = None

    @property
    def port(self) -> int:
        if self._socket is None:
            raise RuntimeError("the SCP is not listening")
        return int(self._socket.getsockname()[1])

    def start(self) -> None:
        """Bind the port and start the receivers (they import and build while the node starts its other
        services); :meth:`open` then waits for them and opens the port."""
        self._socket = bind(self.address)
        for index in range(self.count):
            self._spawn(index)

    def open(self) -> None:
        assert self._socket is not None, "start() first"
        self._await_ready(set(range(self.count)))
        self._socket.listen(_BACKLOG)
        self._go.set()
        self._supervisor = threading.Thread(target=self._supervise, name="receivers", daemon=True)
        self._supervisor.start()
        log.info("%d receiving process(es) accept on %s:%d", self.count, self.address[0], self.port)

    def stop(self) -> None:
        """Tell every receiver to stop (each finishes its running associations within its grace), then end
        whatever is left."""
        self._stopping.set()
        self._stop.set()
        for process in self._processes.values():
            process.join(self.stop_timeout)
            if process.is_alive():
                log.warning("receiving process %d did not stop in %g s; terminating it", process.pid, self.stop_timeout)
                process.terminate()
                process.join(5)
        if self._supervisor is not None:
            self._supervisor.join(5)  # it returns once every receiver has exited
        if self._socket is not None:
            self._socket.close()
            self._socket = None

    def _spawn(self, index: int) -> None:
        assert self._socket is not None
        context = ReceiverContext(index, self._socket, self.slots, self._reports, self._go, self._stop, os.getpid())
        process = self._mp.Process(target=self.target, args=(self.settings, context), name=f"receiver-{index}")
        process.start()
        self._processes[index] = process

    def _await_ready(self, waiting: set[int]) -> None:
        while waiting:
            try:
                state, index, detail = self._reports.get(timeout=self.start_timeout)
            except queue.Empty:
                raise ReceiverStartError(
                    f"receiving process(es) {sorted(waiting)} not ready after {self.start_timeout:g} s"
                ) from None
            if state == "failed":
                raise ReceiverStartError(detail)
            waiting.discard(index)

    def _supervise(self) -> None:
        """Replace a receiving process that died while the node runs."""
        # Linux's parent-death signal follows the thread that started a child: this thread, for a replacement, so
        # it lives until every receiver has exited.
        while True:
            sentinels = {process.sentinel: index for index, process in self._processes.items()}
            ready = wait(list(sentinels), timeout=1.0)
            if self._stopping.is_set():
                if not any(process.is_alive() for process in self._processes.values()):
                    return
                continue
            for sentinel in ready:
                index = sentinels[sentinel]  # type: ignore[index]
                self._processes[index].join(5)  # reaped: its exit code is known
                code = self._processes[index].exitcode
                log.error("receiving process %d exited with %s; starting a new one", index, code)
                self.slots.clear(index)
                if self._stopping.wait(_RESPAWN_DELAY_SECONDS):  # one that cannot start must not spin
                    continue
                self._spawn(index)
                try:
                    self._await_ready({index})
                except ReceiverStartError as err:
                    log.error("receiving process %d could not start again: %s", index, err)


def bind(address: tuple[str, int]) -> socket.socket:
    """The node's socket, bound, not yet listening (IPv4 or IPv6 by the address), as pynetdicom's server would
    bind it."""
    family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        # Rebinding while old connections are in TIME_WAIT (a restart) is allowed; another listener is not.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock
