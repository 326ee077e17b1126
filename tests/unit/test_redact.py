"""Redaction: a URL's userinfo and query keys are masked, the rest kept; the log masks every
line it writes, other libraries' included."""

from __future__ import annotations

import io
import json
import logging

import httpx
import pytest
import structlog

from orchestra import logs
from orchestra.config import LoggingSettings
from orchestra.llm.http import HttpProvider
from orchestra.redact import redact_text, redact_url


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("http://admin:secret@host:11434", "http://***@host:11434"),
        ("http://admin:secret@host:11434/api/chat", "http://***@host:11434/api/chat"),
        ("https://token@example.com/v1", "https://***@example.com/v1"),
        ("http://admin:p@ss@host:1/x", "http://***@host:1/x"),
        ("http://admin:pa/ss@host:1/x", "http://***@host:1/x"),
        ("http://admin:secret@[::1]:8080/v1", "http://***@[::1]:8080/v1"),
        ("https://h/v1?key=abc&x=1", "https://h/v1?key=***&x=1"),
        (
            "https://h/v1?api_key=a&API-KEY=b&token=c&keys=d#f",
            "https://h/v1?api_key=***&API-KEY=***&token=***&keys=d#f",
        ),
        ("https://u:p@h/v1?access_token=a", "https://***@h/v1?access_token=***"),
        # Nothing secret: unchanged.
        ("http://localhost:11434", "http://localhost:11434"),
        ("http://[::1]:80/models/a@b", "http://[::1]:80/models/a@b"),
        ("http://host/v1?model=x", "http://host/v1?model=x"),
        ("not a url", "not a url"),
    ],
)
def test_redact_url_masks_userinfo_and_query_keys_and_keeps_host_and_port(
    url: str, shown: str
) -> None:
    assert redact_url(url) == shown


def test_redact_text_masks_every_url_in_a_message_and_keeps_its_punctuation() -> None:
    text = (
        "cannot connect to Ollama at http://admin:secret@127.0.0.1:11434: Connection refused; "
        "oai: 'https://u:pw@api.example.com/v1?key=k1' failed (see http://x:y@h)."
    )
    assert redact_text(text) == (
        "cannot connect to Ollama at http://***@127.0.0.1:11434: Connection refused; "
        "oai: 'https://***@api.example.com/v1?key=***' failed (see http://***@h)."
    )
    assert redact_text("no url here: admin:secret") == "no url here: admin:secret"


def test_a_provider_names_its_server_without_the_password() -> None:
    async def never(request: httpx.Request) -> httpx.Response:
        raise AssertionError("no request is made")

    client = httpx.AsyncClient(transport=httpx.MockTransport(never))
    provider = HttpProvider("p", client, "http://admin:secret@host:11434/", timeout=1)
    assert provider.url == "http://admin:secret@host:11434"  # what requests go to
    assert provider.where == "the server at http://***@host:11434"


async def test_an_unusable_url_is_a_provider_error_without_the_password() -> None:
    from orchestra.errors import ProviderError

    async with httpx.AsyncClient() as client:
        provider = HttpProvider("p", client, "http://admin:secret@host:notaport", timeout=1)
        with pytest.raises(ProviderError) as failed:
            async with provider.request("GET", "/x", None, None):
                pass
        health = await provider.probe("/x", lambda body: body)
    assert "secret" not in failed.value.message and "***@" in failed.value.message
    assert health[0] is None and "secret" not in health[1]


@pytest.mark.parametrize("fmt", ["json", "console"])
def test_every_log_line_is_redacted_whoever_logged_it(fmt: str) -> None:
    out = io.StringIO()
    root = logging.getLogger()
    saved, config = (root.handlers[:], root.level), structlog.get_config()
    try:
        logs.setup(LoggingSettings(format=fmt), out)
        url = "http://admin:secret@127.0.0.1:11434/api/chat"
        logging.getLogger("httpx").warning(
            'HTTP Request: %s %s "%s %d %s"', "POST", url, "HTTP/1.1", 200, "OK"
        )
        logs.get("orchestra.test").warning("provider.unavailable", url=url)
        try:
            raise ValueError(f"cannot reach {url}")
        except ValueError:
            logs.get("orchestra.test").exception("test.failed")
    finally:
        root.handlers[:], level = saved
        root.setLevel(level)
        structlog.configure(**config)
    written = out.getvalue()
    assert "secret" not in written
    assert written.count("http://***@127.0.0.1:11434/api/chat") >= 3
    if fmt == "json":
        first = json.loads(written.splitlines()[0])
        assert first["event"] == (
            'HTTP Request: POST http://***@127.0.0.1:11434/api/chat "HTTP/1.1 200 OK"'
        )
