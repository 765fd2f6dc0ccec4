"""A minimal HTTP/2 client that sends one gRPC call with header bytes of our choosing.

grpc's own clients refuse to send a header value that is not printable ASCII, but any peer on
the network can; this shows what the server does with one. Request headers go out as HPACK
literals (no Huffman, no indexing); the response's trailers are decoded as far as gRPC's server
writes them (literals and static-table references; Huffman-coded values, which gRPC uses for binary
headers, come back as None).
"""

from __future__ import annotations

import base64
import socket
import struct

from google.rpc import status_pb2

_STATIC_NAMES = {8: b":status", 31: b"content-type"}  # the entries gRPC servers send


def _integer(value: int, prefix_bits: int = 7, first: int = 0) -> bytes:
    limit = (1 << prefix_bits) - 1
    if value < limit:
        return bytes([first | value])
    out, value = [first | limit], value - limit
    while value >= 128:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    return bytes([*out, value])


def _read_integer(data: bytes, at: int, prefix_bits: int) -> tuple[int, int]:
    limit = (1 << prefix_bits) - 1
    value = data[at] & limit
    at += 1
    if value < limit:
        return value, at
    shift = 0
    while True:
        byte = data[at]
        at += 1
        value += (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return value, at


def _read_string(data: bytes, at: int) -> tuple[bytes | None, int]:
    """A literal string; None for a Huffman-coded one (skipped: this decoder has no table)."""
    huffman = bool(data[at] & 0x80)
    length, at = _read_integer(data, at, 7)
    return (None if huffman else data[at : at + length]), at + length


def decode_headers(block: bytes) -> dict[bytes | None, bytes | None]:
    headers: dict[bytes | None, bytes | None] = {}
    at = 0
    while at < len(block):
        byte = block[at]
        if byte & 0x80:  # indexed field (static table)
            index, at = _read_integer(block, at, 7)
            headers[_STATIC_NAMES.get(index, b"#%d" % index)] = b""
            continue
        if byte & 0xE0 == 0x20:  # dynamic table size update
            _, at = _read_integer(block, at, 5)
            continue
        prefix = 6 if byte & 0x40 else 4
        index, at = _read_integer(block, at, prefix)
        name: bytes | None = _STATIC_NAMES.get(index, b"#%d" % index)
        if not index:
            name, at = _read_string(block, at)
        value, at = _read_string(block, at)
        headers[name] = value
    return headers


def _literal(name: bytes, value: bytes) -> bytes:
    return b"\x00" + _integer(len(name)) + name + _integer(len(value)) + value


def _frame(kind: int, flags: int, stream: int, payload: bytes = b"") -> bytes:
    header = struct.pack(">I", len(payload))[1:] + bytes([kind, flags])
    return header + struct.pack(">I", stream) + payload


def call(
    host: str, port: int, path: str, headers: list[tuple[bytes, bytes]], message: bytes = b""
) -> tuple[int, str, status_pb2.Status | None]:
    """One unary gRPC call: (grpc-status, grpc-message, the google.rpc.Status if readable)."""
    block = b"".join(
        _literal(name, value)
        for name, value in [
            (b":method", b"POST"),
            (b":scheme", b"http"),
            (b":path", path.encode()),
            (b":authority", f"{host}:{port}".encode()),
            (b"content-type", b"application/grpc"),
            (b"te", b"trailers"),
            *headers,
        ]
    )
    body = b"\x00" + struct.pack(">I", len(message)) + message
    with socket.create_connection((host, port), timeout=30) as sock:
        sock.sendall(
            b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
            + _frame(4, 0, 0)  # SETTINGS
            + _frame(1, 4, 1, block)  # HEADERS, END_HEADERS
            + _frame(0, 1, 1, body)  # DATA, END_STREAM
        )
        buffer = b""
        while True:
            while len(buffer) < 9 or len(buffer) < 9 + int.from_bytes(buffer[:3], "big"):
                chunk = sock.recv(65536)
                if not chunk:
                    raise ConnectionError("the server closed the connection mid-call")
                buffer += chunk
            length, kind, flags = int.from_bytes(buffer[:3], "big"), buffer[3], buffer[4]
            stream = int.from_bytes(buffer[5:9], "big") & 0x7FFFFFFF
            payload, buffer = buffer[9 : 9 + length], buffer[9 + length :]
            if kind == 4 and not flags & 1:
                sock.sendall(_frame(4, 1, 0))  # SETTINGS ACK
            elif kind in (3, 7) and stream in (0, 1):
                raise ConnectionError(f"the server reset the call (frame type {kind})")
            elif kind == 1 and stream == 1 and flags & 1:  # trailers
                trailers = decode_headers(payload)
                details = trailers.get(b"grpc-status-details-bin")
                status = None
                if details is not None:
                    padded = details + b"=" * (-len(details) % 4)
                    status = status_pb2.Status.FromString(base64.b64decode(padded))
                code = trailers[b"grpc-status"]
                assert code is not None, "grpc-status must be readable"
                text = (trailers.get(b"grpc-message") or b"").decode()
                return int(code), text, status
