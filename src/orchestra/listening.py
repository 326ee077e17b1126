"""The listening socket of ``orchestra serve``: one port, shared by every service process."""

from __future__ import annotations

import socket
import sys

from orchestra.errors import ConfigError

#: Each process listens on a socket of its own bound to the same port, and the kernel spreads
#: new connections evenly over them (Linux's SO_REUSEPORT). Elsewhere all share one socket,
#: and whichever process wakes first accepts every connection waiting (a burst of them can
#: go 2:1 to one of two processes).
REUSE_PORT = sys.platform.startswith("linux") and hasattr(socket, "SO_REUSEPORT")


def bind_socket(host: str, port: int, *, shared: bool = True) -> socket.socket:
    """A socket bound to ``host:port``, with SO_REUSEPORT where :data:`REUSE_PORT` and
    ``shared`` (a single process holds its port alone).

    The supervisor binds one to hold the port (it never listens on it, so it takes no
    connection where each process has its own); each process then binds its own, or
    listens on the supervisor's.

    The socket is not inheritable: a program the service starts (the embedded model's
    process) must not hold the port, or it would keep it bound after the service died. The
    supervisor's service processes get theirs from multiprocessing, which passes it to each
    on purpose.

    Raises:
        ConfigError: the address cannot be bound (taken, or not this machine's).
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY only on sockets that say they are TCP
    # (without it, a keep-alive request can wait 40 ms for a delayed ACK).
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if REUSE_PORT and shared:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        reason = exc.strerror or str(exc)
        raise ConfigError(f"server: cannot listen on {host}:{port}: {reason}") from None
    return sock
