"""Schemathesis against the live server: every phase and every check, over sockets.

The run is schemathesis' own engine, the one `st run` drives, started from here so the
test reads its events: every check failure and every engine error is collected, grouped
by operation, check, title and status, and printed with a curl command that reproduces it.

Bounded and deterministic: a fixed seed (printed; CHATTERD_CONTRACT_SEED overrides it),
one worker, no example database, no schemathesis cache, at most CHATTERD_CONTRACT_EXAMPLES
cases per operation and phase (the coverage phase is bounded by the document itself), and
no time budget (with one, fuzzing and stateful repeat until it is spent).
"""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import schemathesis
from schemathesis import engine
from schemathesis.config import SchemathesisConfig
from schemathesis.engine import Status, events

from conftest import chatterd_env

SEED = int(os.environ.get("CHATTERD_CONTRACT_SEED", "20260601"))
MAX_EXAMPLES = int(os.environ.get("CHATTERD_CONTRACT_EXAMPLES", "10"))
ALL_PHASES = ("examples", "coverage", "fuzzing", "stateful")
PHASES = tuple(
    os.environ.get("CHATTERD_CONTRACT_PHASES", "examples,coverage,fuzzing,stateful").split(",")
)
API_KEY = "contract-key"
OPERATIONS = {
    "POST /llmprompt",
    "POST /llmchat",
    "POST /llmtools",
    "GET /llmchat",
    "GET /llmtools",
    "GET /conversations/{appID}",
    "DELETE /conversations/{appID}",
    "POST /conversations/{appID}/stop",
    "GET /weather",
    "GET /models",
    "GET /health",
    "GET /metrics",
    "GET /playground",
}  # and GET /openapi.json, which schemathesis reads but does not test (test_ship checks it)


@schemathesis.deserializer("application/x-ndjson")
def ndjson_lines(ctx: schemathesis.DeserializationContext, response: schemathesis.Response) -> Any:
    """NDJSON as the list of its lines, for the document's array `schema` to validate.

    Without a deserializer schemathesis skips validating these responses, silently.
    """
    return [json.loads(line) for line in response.content.splitlines() if line.strip()]


@dataclass
class Finding:
    operation: str
    check: str
    title: str
    message: str
    status: str
    answer: str
    curl: str
    count: int = 1


@dataclass
class Run:
    findings: dict[tuple[str, ...], Finding] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    phases: dict[str, str] = field(default_factory=dict)
    phase_seconds: Counter[str] = field(default_factory=Counter)
    requests: Counter[str] = field(default_factory=Counter)
    links: Counter[str] = field(default_factory=Counter)
    operations: set[str] = field(default_factory=set)
    seconds: float = 0.0

    def add(self, operation: str, check: str, failure: Any, response: Any, curl: str) -> None:
        status, answer = "-", "no response"
        if response is not None:
            status = str(response.status_code)
            kind = (response.headers.get("content-type") or ["-"])[0]
            answer = f"{status} {kind} {response.content[:300]!r}"
        key = (operation, check, failure.title, status)
        if key in self.findings:
            self.findings[key].count += 1
        else:
            self.findings[key] = Finding(
                operation, check, failure.title, failure.message, status, answer, curl
            )

    def report(self) -> str:
        lines = [
            f"schemathesis {schemathesis.__version__}, seed {SEED}, at most {MAX_EXAMPLES}"
            f" examples: {self.requests.total()} requests in {self.seconds:.1f}s",
            "phases: "
            + ", ".join(
                f"{name} {status} ({self.requests[name]} requests, {self.phase_seconds[name]:.1f}s)"
                for name, status in self.phases.items()
            ),
            *(f"  link {name}: {count}" for name, count in sorted(self.links.items())),
            f"{len(self.findings)} distinct failures, {len(self.errors)} errors",
        ]
        for finding in sorted(self.findings.values(), key=lambda f: (f.operation, f.check)):
            lines += [
                "",
                f"[{finding.check}] {finding.operation}: {finding.title} ({finding.count} cases)",
                *("    " + line for line in finding.message.splitlines() if line.strip()),
                f"    answered: {finding.answer}",
                "    " + finding.curl.replace("\n", "\n    "),
            ]
        lines += [f"\nerror: {error}" for error in self.errors]
        return "\n".join(lines)


def run_schemathesis(base_url: str, headers: dict[str, str] | None = None) -> Run:
    config = SchemathesisConfig.from_dict(
        {
            "seed": SEED,
            "base-url": base_url,
            "headers": headers or {},
            "workers": 1,  # one worker: the same seed sends the same requests in the same order
            "cache": {"enabled": False},  # no .schemathesis/ cache replayed into the next run
            "continue-on-failure": True,  # every failure of an operation, not just its first
            "request-timeout": 15,
            "checks": {"enabled": True, "max_response_time": 5},  # a limit turns the check on
            "phases": {name: {"enabled": name in PHASES} for name in ALL_PHASES},
            "generation": {"max-examples": MAX_EXAMPLES, "database": "none"},
        }
    )
    # The document is fetched with the same headers, so it needs the key as the routes do.
    schema = schemathesis.openapi.from_url(f"{base_url}/openapi.json", config=config)
    run = Run()
    started = time.monotonic()
    phase_started = started
    for event in engine.from_schema(schema).execute():
        if isinstance(event, events.ScenarioFinished):
            recorder = event.recorder
            run.requests[event.phase.value] += len(recorder.interactions)
            for node in recorder.cases.values():
                run.operations.add(node.value.operation.label)
                if node.transition is not None:
                    run.links[node.transition.id] += 1
            for case_id, checks in recorder.checks.items():
                for check in checks:
                    if check.status == Status.FAILURE and check.failure_info is not None:
                        failure = check.failure_info.failure
                        response = recorder.find_response(case_id=failure.case_id or case_id)
                        operation = failure.operation or recorder.label
                        curl = check.failure_info.code_sample
                        run.add(operation, check.name, failure, response, curl)
                    elif check.status == Status.ERROR:
                        run.errors.append(f"{recorder.label}: check {check.name} crashed")
        elif isinstance(event, events.PhaseStarted):
            phase_started = time.monotonic()
        elif isinstance(event, events.PhaseFinished):
            run.phases[event.phase.name.value] = event.status.value
            run.phase_seconds[event.phase.name.value] += time.monotonic() - phase_started
        elif isinstance(event, events.NonFatalError):
            run.errors.append(f"{event.label}: {event.info.title}: {event.info.message}")
        elif isinstance(event, events.FatalError):
            raise event.exception
        elif isinstance(event, events.EngineFinished):
            for failure in event.failures:  # from checks that judge the whole run
                run.add(failure.operation or "-", "after_run", failure, None, "")
    run.seconds = time.monotonic() - started
    return run


def check(run: Run) -> None:
    print(run.report())
    for phase in PHASES:
        assert run.phases.get(phase) not in (None, "skip"), f"{phase} did not run\n{run.report()}"
    assert run.operations >= OPERATIONS, f"untested: {OPERATIONS - run.operations}"
    assert not run.findings and not run.errors, run.report()


def test_contract_without_api_keys(chatterd, ollama, meteo):
    check(run_schemathesis(chatterd.url))


def test_contract_with_api_keys(start_chatterd, database_url, ollama, meteo):
    env = {**chatterd_env(database_url, ollama.url, meteo.url), "CHATTERD_API_KEYS": API_KEY}
    server = start_chatterd(env)
    check(run_schemathesis(server.url, {"Authorization": f"Bearer {API_KEY}"}))
