"""The listening socket of our HTTP servers, bound before anything slow starts.

A server that loads a corpus or a pool of vLLM servers first and binds its port last makes a user wait minutes for
"address already in use". Binding first fails at once, naming the address; `--port 0` picks a free port, and the
printed address is the real one.
"""

from __future__ import annotations

import errno
import socket


def listen(host: str, port: int, server: str) -> socket.socket:
    """A socket bound to ``(host, port)`` and listening; connections queue until uvicorn accepts them."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        if e.errno == errno.EADDRINUSE:
            raise SystemExit(f"{server}: port {port} on {host} is in use; choose another with --port "
                             f"(0 picks a free one)") from None
        raise SystemExit(f"{server}: cannot listen on {host}:{port} ({e.strerror})") from None
    sock.listen(2048)
    return sock
