"""Whether a server answers at all, asked once with a short timeout before any long work depends on it."""

from __future__ import annotations

import socket
from urllib.parse import urlparse


def unreachable(endpoint: str, timeout_s: float) -> str:
    """Why ``endpoint`` (an http(s) URL) cannot be reached: empty when a TCP connection opens within
    ``timeout_s``. Client libraries retry with growing waits for minutes before they give up."""
    url = urlparse(endpoint)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname or "", port), timeout=timeout_s):
            return ""
    except OSError as err:
        return f"{url.hostname} cannot be reached ({err.__class__.__name__}: {err})"
