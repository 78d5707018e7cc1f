"""POST /llmprompt: Ollama's /api/generate, relayed byte for byte as it streams."""

from __future__ import annotations

import json
import threading

from standins import Reply, Stream

LINES = [
    '{"model":"gemma3:270m","created_at":"2026-11-22T12:00:00.1Z","response":"Ann","done":false}',
    '{"model":"gemma3:270m","created_at":"2026-11-22T12:00:00.2Z",'
    '"response":" Arbor\\n\\tis","done":false}',
    '{"model":"gemma3:270m","created_at":"2026-11-22T12:00:00.3Z","response":"","done":true,'
    '"done_reason":"stop","context":[1,2,3],"total_duration":1,"eval_count":3}',
]


def test_the_ndjson_is_passed_through_unchanged(client, ollama):
    ollama.script = lambda received: Stream(list(LINES))
    body = {"model": "gemma3:270m", "prompt": "Where?", "stream": True, "options": {"seed": 1}}

    response = client.post("/llmprompt", json=body)

    assert response.status_code == 200
    assert response.headers["content-type"] == "application/x-ndjson"
    assert response.content == "".join(line + "\n" for line in LINES).encode()
    assert ollama.generations()[-1].path == "/api/generate"
    assert ollama.generations()[-1].body == body


def test_lines_arrive_as_ollama_sends_them(client, ollama):
    more = threading.Event()  # Ollama sends the rest only once the first line has arrived
    ollama.script = lambda received: Stream(list(LINES), hold_after=1, release=more)
    body = {"model": "gemma3:270m", "prompt": "p"}
    with client.stream("POST", "/llmprompt", json=body) as response:
        lines = response.iter_lines()
        first = next(lines)  # not buffered: it comes while Ollama holds back the rest
        more.set()
        arrivals = [first, *lines]
    assert arrivals == LINES


def test_ollama_refusal_keeps_its_status_and_body(client, ollama):
    response = client.post("/llmprompt", json={"model": "missing:1b", "prompt": "p"})
    assert response.status_code == 404
    assert response.json() == {"error": "model 'missing:1b' not found"}

    # Ollama failing is a bad gateway to chatterd's clients; its message stays.
    ollama.script = lambda received: Reply(500, {"error": "llama runner process has terminated"})
    response = client.post("/llmprompt", json={"model": "gemma3:270m", "prompt": "p"})
    assert response.status_code == 502
    assert response.json() == {"error": "llama runner process has terminated"}


def test_malformed_json_is_refused_before_ollama(client, ollama):
    response = client.post("/llmprompt", content=b'{"model": ')
    assert response.status_code == 400
    assert "not valid JSON" in response.json()["error"]
    response = client.post("/llmprompt", content=json.dumps(["model"]).encode())
    assert response.status_code == 422
    assert ollama.generations() == []
