"""The milter packet codec: round trips, and garbage gives MilterProtocolError, never a crash."""
from __future__ import annotations

import socket

import pytest
from hypothesis import given
from hypothesis import strategies as st

from milters.core.errors import MilterProtocolError
from milters.core.milter_protocol import (ActionFlag, MacroStage, OptNeg, ProtocolFlag,
                                          encode_packet, read_packet)

macro_names = st.lists(st.from_regex(r"\{?[a-z_]{1,12}\}?", fullmatch=True), min_size=1,
                       max_size=5)


@given(actions=st.integers(0, 0x1FF), protocol=st.integers(0, 0x1FFFFF),
       macros=st.dictionaries(st.sampled_from(list(MacroStage)), macro_names, max_size=4))
def test_optneg_round_trips(actions: int, protocol: int,
                            macros: dict[MacroStage, list[str]]) -> None:
    packet = OptNeg(6, ActionFlag(actions), ProtocolFlag(protocol), macros)
    assert OptNeg.decode(packet.encode()) == packet


@given(st.binary(max_size=64))
def test_optneg_decode_of_garbage_is_a_protocol_error_or_a_value(data: bytes) -> None:
    try:
        OptNeg.decode(data)
    except MilterProtocolError:
        pass


@given(command=st.binary(min_size=1, max_size=1), data=st.binary(max_size=300))
def test_packets_round_trip_over_a_socket(command: bytes, data: bytes) -> None:
    left, right = socket.socketpair()
    with left, right:
        left.sendall(encode_packet(command, data))
        assert read_packet(right) == (command, data)


@pytest.mark.parametrize("wire", [b"\x00\x00\x00\x00", b"\xff\xff\xff\xffO", b"\x00\x00\x00\x05O"])
def test_bad_lengths_and_truncation_are_protocol_errors(wire: bytes) -> None:
    left, right = socket.socketpair()
    with left, right:
        left.sendall(wire)
        left.shutdown(socket.SHUT_WR)
        with pytest.raises(MilterProtocolError):
            read_packet(right)
