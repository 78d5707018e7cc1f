"""The streamed generations' own HTTP client (ollama_http.py, through ollama.Streams),
against the Ollama stand-in over real sockets: https, credentials from the URL, kept
connections and their limit. (Its failures and timeouts, through chatterd itself, are in
test_reliability.py; its parsing for any input in test_wire.py.)"""

from __future__ import annotations

import asyncio
import base64
import json
import ssl
from collections.abc import Iterator

import pytest

from certificates import make_certificate
from ollama import OllamaError, Streams
from standins import OllamaStandIn, Stream, chat_line, done_line, text_stream

MODEL = "gemma3:270m"
BODY = json.dumps({"model": MODEL, "messages": []}).encode()


def contents(lines: list[bytes]) -> str:
    return "".join(json.loads(line)["message"]["content"] for line in lines)


async def generate(streams: Streams) -> list[bytes]:
    opened = await streams.open("/api/chat", BODY)
    try:
        return [line async for line in opened.lines()]
    finally:
        await opened.aclose()


@pytest.fixture
def certificate(tmp_path) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """A server's TLS context for 127.0.0.1, and a client's that trusts it."""
    cert, key = make_certificate(["127.0.0.1"], [])
    (tmp_path / "cert.pem").write_bytes(cert)
    (tmp_path / "key.pem").write_bytes(key)
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server.load_cert_chain(tmp_path / "cert.pem", tmp_path / "key.pem")
    return server, ssl.create_default_context(cafile=str(tmp_path / "cert.pem"))


@pytest.fixture
def tls_ollama(certificate) -> Iterator[OllamaStandIn]:
    standin = OllamaStandIn(tls=certificate[0])
    yield standin
    standin.close()


def test_an_ollama_behind_https_with_credentials_in_its_url(tls_ollama, certificate):
    tls_ollama.script = lambda received: text_stream(MODEL, "over TLS")
    url = f"https://ann:s%3Acret@127.0.0.1:{tls_ollama.port}"
    streams = Streams(
        url,
        "https://127.0.0.1",
        connect_timeout=5,
        timeout=5,
        max_connections=4,
        ssl_context=certificate[1],
    )

    lines = asyncio.run(generate(streams))

    assert contents(lines) == "over TLS"
    [received] = tls_ollama.received
    assert received.path == "/api/chat" and received.body == json.loads(BODY)
    assert received.headers["authorization"] == "Basic " + base64.b64encode(b"ann:s:cret").decode()
    assert received.headers["host"] == f"127.0.0.1:{tls_ollama.port}"  # without credentials


def test_an_untrusted_certificate_makes_the_server_unreachable(tls_ollama):
    streams = Streams(
        tls_ollama.url, tls_ollama.url, connect_timeout=5, timeout=5, max_connections=4
    )
    with pytest.raises(OllamaError) as failure:
        asyncio.run(generate(streams))
    assert failure.value.status == 502 and failure.value.unreachable
    assert "is unreachable: SSLCertVerificationError" in failure.value.error
    assert tls_ollama.received == []


def test_a_connection_is_kept_for_the_next_generation(ollama):
    ollama.script = lambda received: text_stream(MODEL, "again")
    streams = Streams(ollama.url, ollama.url, connect_timeout=5, timeout=5, max_connections=4)
    before = ollama.connections

    async def three() -> list[str]:
        said = [contents(await generate(streams)) for _ in range(3)]
        streams.close()
        return said

    assert asyncio.run(three()) == ["again"] * 3
    assert ollama.connections - before == 1


def test_generations_past_the_limit_wait_for_a_connection(ollama):
    # The first lasts 0.6 s: without the limit, the second would be in flight meanwhile.
    slow = Stream([chat_line(MODEL, "slow "), chat_line(MODEL, "one"), done_line(MODEL)], gap=0.3)
    answers = iter([slow, text_stream(MODEL, "next")])
    ollama.script = lambda received: next(answers)
    streams = Streams(ollama.url, ollama.url, connect_timeout=5, timeout=5, max_connections=1)

    async def two_at_once() -> list[str]:
        both = await asyncio.gather(generate(streams), generate(streams))
        streams.close()
        return [contents(lines) for lines in both]

    assert asyncio.run(two_at_once()) == ["slow one", "next"]
    assert ollama.most_in_flight == 1
