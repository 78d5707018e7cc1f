"""Running chatterd for real: HTTPS, the systemd unit, /health, /openapi.json, logs, API keys."""

from __future__ import annotations

import ipaddress
import json
import shutil
import ssl
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID
from openapi_spec_validator import validate

import main
from conftest import ROOT, chatterd_env, free_port
from sse import chat_body, post

CHATTERD = str(Path(sys.executable).parent / "chatterd")

# HTTPS


def test_gencert_writes_a_certificate_phones_accept(tmp_path):
    cert, key = tmp_path / "chatterd.crt", tmp_path / "chatterd.key"
    subprocess.run(
        [
            CHATTERD,
            "gencert",
            "--ip",
            "192.0.2.10",
            "--dns",
            "chatterd.example",
            "--cert",
            str(cert),
            "--key",
            str(key),
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )
    certificate = x509.load_pem_x509_certificate(cert.read_bytes())
    names = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("192.0.2.10")]
    assert names.get_values_for_type(x509.DNSName) == ["chatterd.example"]
    usage = certificate.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert ExtendedKeyUsageOID.SERVER_AUTH in usage
    assert certificate.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    lifetime = certificate.not_valid_after_utc - certificate.not_valid_before_utc
    assert 360 <= lifetime.days <= 366
    assert key.stat().st_mode & 0o077 == 0  # the key is for its owner only


def test_gencert_refuses_an_address_that_is_not_an_ip(tmp_path):
    result = subprocess.run(
        [CHATTERD, "gencert", "--ip", "my-server"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "does not appear to be an IPv4 or IPv6 address" in result.stderr
    assert not (tmp_path / "chatterd.crt").exists()


@pytest.mark.parametrize("tls", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3])
def test_https_with_a_generated_certificate(
    start_chatterd, tmp_path, database_url, ollama_standin, meteo_standin, tls
):
    cert, key = tmp_path / "chatterd.crt", tmp_path / "chatterd.key"
    subprocess.run(
        [CHATTERD, "gencert", "--ip", "127.0.0.1", "--cert", str(cert), "--key", str(key)],
        check=True,
        capture_output=True,
        timeout=60,
    )
    env = chatterd_env(database_url, ollama_standin.url, meteo_standin.url)
    server = start_chatterd(
        env, "--ssl-certificate", str(cert), "--ssl-keyfile", str(key), command=[CHATTERD]
    )
    # A phone that trusts only this certificate, as after installing it as a user CA.
    trust = ssl.create_default_context(cafile=str(cert))
    trust.minimum_version = trust.maximum_version = tls
    response = httpx.get(f"https://127.0.0.1:{server.port}/health", verify=trust, timeout=10)
    assert response.status_code == 200
    assert response.json()["status"] == "ok"


# systemd

UNIT = ROOT / "deploy" / "chatterd.service"


def unit_settings() -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for line in UNIT.read_text().splitlines():
        if "=" in line and not line.startswith("#"):
            name, value = line.split("=", 1)
            found.setdefault(name, []).append(value)
    return found


def test_the_unit_runs_chatterd_unprivileged_and_hardened():
    unit = unit_settings()
    assert unit["User"] != ["root"] and unit["User"]
    assert unit["ExecStart"][0].startswith("/opt/chatterd/.venv/bin/chatterd ")
    assert unit["AmbientCapabilities"] == ["CAP_NET_BIND_SERVICE"]
    assert unit["Restart"] == ["on-failure"]
    assert unit["EnvironmentFile"] == ["-/etc/chatterd/chatterd.env"]
    for hardening in ("NoNewPrivileges", "PrivateTmp"):
        assert unit[hardening] == ["true"]
    assert unit["ProtectSystem"] == ["strict"]
    assert unit["ReadWritePaths"] == ["/var/lib/chatterd"]
    assert unit["Environment"] == ["CHATTERD_DATA_DIR=/var/lib/chatterd"]


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze here")
def test_systemd_accepts_the_unit(tmp_path):
    # Pointed at this checkout, since systemd checks that the program exists.
    unit = UNIT.read_text().replace("/opt/chatterd/.venv", str(ROOT / ".venv"))
    unit = unit.replace("WorkingDirectory=/opt/chatterd", f"WorkingDirectory={ROOT}")
    (tmp_path / "chatterd.service").write_text(unit)
    result = subprocess.run(
        ["systemd-analyze", "verify", str(tmp_path / "chatterd.service")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr


# /health


def test_health_reports_database_and_ollama(client):
    response = client.get("/health")
    assert response.status_code == 200
    body = response.json()
    assert body["status"] == "ok"
    assert body["database"]["reachable"] is True
    assert body["ollama"]["reachable"] is True and body["ollama"]["version"] == "0.33.0"
    [server] = body["ollama"]["servers"]
    assert server["up"] is True and server["in_flight"] == 0
    assert "gemma3:270m" in server["models"]


def test_health_is_degraded_without_ollama(start_chatterd, database_url, meteo_standin):
    server = start_chatterd(
        chatterd_env(database_url, f"http://127.0.0.1:{free_port()}", meteo_standin.url)
    )
    response = httpx.get(f"{server.url}/health", timeout=30)
    assert response.status_code == 200
    assert response.json()["status"] == "degraded"
    assert response.json()["ollama"]["reachable"] is False


# /openapi.json


def test_openapi_document_is_valid_and_covers_every_route(client):
    response = client.get("/openapi.json")
    assert response.status_code == 200
    document = response.json()
    validate(document)
    assert document["openapi"] == "3.2.0"
    served = {
        (method.lower(), route.path.replace(":appID}", "}"))
        for route in main.server.routes
        if not route.path.endswith("/")  # the trailing-slash forms of the same routes
        for method in route.methods
        if method != "HEAD"
    }
    documented = {(method, path) for path, item in document["paths"].items() for method in item}
    assert documented == served
    chat = document["paths"]["/llmchat"]["post"]["responses"]
    assert "itemSchema" in chat["200"]["content"]["text/event-stream"]
    assert {"400", "404", "422", "502"} <= set(chat)
    prompt = document["paths"]["/llmprompt"]["post"]["responses"]
    assert "application/x-ndjson" in prompt["200"]["content"]


# Access log


def test_one_access_line_per_request_without_contents(client, chatterd, ollama, app_id):
    post(client, "/llmchat", chat_body(app_id, "a private thought"))
    client.get("/weather", params={"lat": "x", "lon": "1"})
    log = chatterd.log()
    chat_lines = [line for line in log.splitlines() if f"appID={app_id}" in line]
    assert len(chat_lines) == 1
    assert "POST /llmchat 200 " in chat_lines[0]
    assert "GET /weather 422 " in log
    assert "private thought" not in log


def test_json_access_log(start_chatterd, database_url, ollama, meteo_standin, app_id):
    env = {
        **chatterd_env(database_url, ollama.url, meteo_standin.url),
        "CHATTERD_LOG_FORMAT": "json",
    }
    server = start_chatterd(env)
    with httpx.Client(base_url=server.url, timeout=30) as client:
        post(client, "/llmchat", chat_body(app_id, "hello"))
    server.stop()
    entries = [
        json.loads(line)
        for line in server.log().splitlines()
        if line.startswith("{") and app_id in line
    ]
    assert len(entries) == 1
    entry = entries[0]
    assert (entry["method"], entry["path"], entry["status"], entry["app_id"]) == (
        "POST",
        "/llmchat",
        200,
        app_id,
    )
    assert entry["duration_ms"] > 0 and "time" in entry


# API keys


def test_api_keys_when_configured(start_chatterd, database_url, ollama, meteo_standin, app_id):
    env = {
        **chatterd_env(database_url, ollama.url, meteo_standin.url),
        "CHATTERD_API_KEYS": "k-one, k-two",
    }
    server = start_chatterd(env)
    with httpx.Client(base_url=server.url, timeout=30) as client:
        missing = client.post("/llmchat", json=chat_body(app_id, "hi"))
        wrong = client.post(
            "/llmchat", json=chat_body(app_id, "hi"), headers={"Authorization": "Bearer k-three"}
        )
        right = post(
            client.__class__(
                base_url=server.url, timeout=30, headers={"Authorization": "Bearer k-two"}
            ),
            "/llmchat",
            chat_body(app_id, "hi"),
        )
        open_health = client.get("/health")
        not_a_token = client.get("/llmchat", params={"appID": app_id, "token": "\u00b2.x"})
        assert not_a_token.status_code == 401  # a digit that int() refuses: no 500
    for refused in (missing, wrong):
        assert refused.status_code == 401
        assert "API key" in refused.json()["error"]
        assert refused.headers["www-authenticate"].startswith("Bearer")
        assert refused.headers["connection"] == "close"  # its body was never read
    assert right.status == 200 and right.text() == "You said: hi"
    assert open_health.status_code == 200
    assert ollama.chats() and len(ollama.chats()) == 1  # only the authorized one got through


def test_no_api_keys_means_an_open_server(client, ollama, app_id):
    assert post(client, "/llmchat", chat_body(app_id, "hi")).status == 200
