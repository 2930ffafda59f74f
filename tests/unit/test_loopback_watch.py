"""The loopback watch itself (tests/loopback.py): it must see a socket on every interface."""

from __future__ import annotations

import socket

import psutil
import pytest
from loopback import foreign_sockets, is_loopback

pytestmark = pytest.mark.unit


def test_a_socket_bound_to_every_interface_is_reported():
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:  # bound for a moment, never sent to
        sock.bind(("0.0.0.0", 0))
        [found] = foreign_sockets({psutil.Process().pid})
        assert f"local 0.0.0.0:{sock.getsockname()[1]}" in found


def test_loopback_addresses():
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("::ffff:127.0.0.1") and is_loopback("127.0.0.2")
    assert not is_loopback("0.0.0.0") and not is_loopback("::") and not is_loopback("192.0.2.2")
