"""One TLS context for the service's outgoing HTTPS connections (model servers, webhooks).

Building a context reads the whole CA bundle, about 20 ms of CPU; httpx builds one per
transport unless it is given one, and the model client alone holds several transports. A
context is safe to share between connections and threads.
"""

from __future__ import annotations

import functools
import ssl

import httpx


@functools.cache
def client_context() -> ssl.SSLContext:
    """The context every HTTPS client of this process verifies servers with: httpx's default
    (certifi's bundle, or ``SSL_CERT_FILE`` / ``SSL_CERT_DIR`` when set), built once."""
    return httpx.create_ssl_context()
