"""The receiving processes' service alone (dicom_node/network/processes.py), with toy receivers."""

from __future__ import annotations

import socket
from typing import Any

import pytest

from dicom_node.network.processes import ReceiverContext, ReceiverStartError, ReceivingProcesses


def _fails(_settings: Any, context: ReceiverContext) -> None:
    context.reports.put(("failed", context.index, f"receiving process {context.index}: no job database"))


def _serves(_settings: Any, context: ReceiverContext) -> None:
    context.reports.put(("ready", context.index, None))
    context.go.wait(30)
    context.stop.wait(30)


def test_a_receiver_that_cannot_start_fails_the_start_with_its_reason() -> None:
    receivers = ReceivingProcesses(("127.0.0.1", 0), 2, 4, target=_fails, settings=None, start_timeout=60)
    receivers.start()
    try:
        with pytest.raises(OSError, match="no job database") as raised:  # serve prints it as one line
            receivers.open()
        assert isinstance(raised.value, ReceiverStartError)
    finally:
        receivers.stop()


def test_the_port_opens_once_every_receiver_is_ready_and_closes_on_stop() -> None:
    receivers = ReceivingProcesses(("127.0.0.1", 0), 2, 4, target=_serves, settings=None, start_timeout=60)
    receivers.start()
    port = receivers.port
    with socket.socket() as probe:  # bound, not listening yet: refused
        assert probe.connect_ex(("127.0.0.1", port)) != 0
    try:
        receivers.open()
        with socket.create_connection(("127.0.0.1", port), timeout=5):
            pass
    finally:
        receivers.stop()
    assert all(process.exitcode is not None for process in receivers._processes.values())
    with socket.socket() as probe:
        assert probe.connect_ex(("127.0.0.1", port)) != 0
