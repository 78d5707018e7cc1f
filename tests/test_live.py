r"""The main flows against a real Ollama: skipped unless CHATTERD_LIVE_OLLAMA names one.

    CHATTERD_LIVE_OLLAMA=http://localhost:11434 CHATTERD_LIVE_MODEL=qwen3:0.6b \
        uv run pytest tests/test_live.py

A real model's words vary, so these check the protocol and the storage, not the wording.
"""

from __future__ import annotations

import json
import os

import httpx
import pytest

from conftest import chatterd_env
from sse import chat_body, post, stored

LIVE_OLLAMA = os.environ.get("CHATTERD_LIVE_OLLAMA", "")
MODEL = os.environ.get("CHATTERD_LIVE_MODEL", "qwen3:0.6b")

pytestmark = pytest.mark.skipif(not LIVE_OLLAMA, reason="set CHATTERD_LIVE_OLLAMA to run")


@pytest.fixture(scope="module")
def live(module_chatterd, database_url, meteo_standin):
    server = module_chatterd(chatterd_env(database_url, LIVE_OLLAMA, meteo_standin.url))
    with httpx.Client(base_url=server.url, timeout=1200) as client:
        yield client


def test_live_prompt_streams_ndjson(live):
    response = live.post("/llmprompt", json={"model": MODEL, "prompt": "Say hi.", "stream": True})
    assert response.status_code == 200
    lines = [json.loads(line) for line in response.text.splitlines()]
    assert lines[-1]["done"] is True


def test_live_chat_carries_context_and_stores_the_reply(live, db, app_id):
    post(live, "/llmchat", chat_body(app_id, "I live in Ann Arbor.", model=MODEL))
    answer = post(live, "/llmchat", chat_body(app_id, "In what state do I live?", model=MODEL))
    assert answer.status == 200
    assert all("model" in line and "created_at" in line for line in answer.data())
    assert stored(db, app_id)[-1] == ("assistant", answer.text())


def test_live_tools_offer_a_device_tool(live, app_id):
    tool = {
        "type": "function",
        "function": {
            "name": "get_location",
            "description": "Get current location",
            "parameters": None,
        },
    }
    answer = post(
        live,
        "/llmtools",
        chat_body(app_id, "Where am I? Use your tools.", model=MODEL, tools=[tool]),
    )
    assert answer.status == 200
    assert answer.named("error") == []
