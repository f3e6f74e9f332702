"""The real client libraries and instrumentations, end to end: each call metered once, with the provider's numbers.

The optional group `instrumentations` (pyproject.toml; `make test` installs it) brings openai,
anthropic, langchain-openai and the OpenTelemetry instrumentations of three projects. Each family runs
in its own process (tests/instrumented_driver.py: instrumentors patch libraries process-wide and can
conflict) against tests/fakeprovider.py, with meterline's MeterSpanProcessor on the TracerProvider.

Ground truth is what the fake provider served, in the provider's own terms, turned into meterline's
convention here without meterline's code: `input_tokens` counts every input token, cache reads and
writes included; `output_tokens` every output token, reasoning included; cache and reasoning counts
are subsets. Every call is one event, however many spans the libraries made of it (the Anthropic SDK
traces itself under any instrumentor), carrying the tenant of the caller's own span and the team of
the resource. A rate-limited call is one `rate_limited` event with no tokens; a stream whose usage
never came is one event marked as missing usage, with no tokens.

Where a library's spans do not carry a number at all, the case says so in LIMITATIONS and expects
what can be known; the test checks that the number really is absent from the raw spans, so a
limitation that a later version lifts fails here and is removed.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from fakeprovider import FakeProvider
from instrumented_driver import FAMILIES, MARK, team_of, tenant_of

DRIVER = Path(__file__).with_name("instrumented_driver.py")
RUN_TIMEOUT_S = 240
RATE_LIMIT_ERRORS = {"RateLimitError", "OpenAIRateLimitError"}  # openai's and anthropic's; langchain-openai's own

# (family, case) -> (why, the expected fields that differ from the ground truth). None: no span, so no event.
# Decided from the raw span attributes each library emitted (the driver prints them); checked below.
LIMITATIONS: dict[tuple[str, str], tuple[str, dict | None]] = {
    **{("otel-v2", case): ("opentelemetry-instrumentation-openai-v2 2.4b0 records no cached and no reasoning tokens on a chat span "
                           "(only gen_ai.usage.input_tokens / output_tokens, which include them)",
                           {"cache_read_tokens": 0, "reasoning_tokens": 0})
       for case in ("chat", "chat_stream", "lc_invoke", "lc_stream")},
    **{("otel-v2", case): ("opentelemetry-instrumentation-openai-v2 2.4b0 does not instrument the Responses API: no span", None)
       for case in ("responses", "responses_stream", "responses_429")},
    ("openllmetry", "chat_stream"): ("opentelemetry-instrumentation-openai 0.62.4 records no reasoning tokens for a streamed "
                                     "chat completion (it does for a non-streamed one)", {"reasoning_tokens": 0}),
    ("openllmetry", "lc_stream"): ("opentelemetry-instrumentation-langchain 0.62.4 names the requested model as "
                                   "gen_ai.response.model of a stream and suppresses the OpenAI span: the dated model is on no span",
                                   {"model": "gpt-4.1-mini"}),
}

CASES = [(family, case) for family, cases in FAMILIES.items() for case in cases]


# --- running the families ----------------------------------------------------------------------------

class Runs:
    """Starts every family's driver at once (they are independent processes) and hands out their lines."""

    def __init__(self, fake: FakeProvider, families: list[str]):
        self.fake = fake
        self.families = families  # those the selected tests need, all started on the first request
        self._lock = threading.Lock()
        self._procs: dict[str, subprocess.Popen] = {}
        self._results: dict[str, tuple[int, dict[str, dict], str]] = {}

    def _env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("OTEL_", "ANTHROPIC_", "OPENAI_", "TRACELOOP_", "LANGCHAIN_", "LANGSMITH_", "OPENINFERENCE_"))}
        env["PYTHONUNBUFFERED"] = "1"
        return env

    def start_all(self) -> None:
        with self._lock:
            for family in self.families:
                if family not in self._procs:
                    self._procs[family] = subprocess.Popen(
                        [sys.executable, str(DRIVER), family, self.fake.url], cwd=DRIVER.parent.parent, env=self._env(),
                        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def get(self, family: str) -> tuple[int, dict[str, dict], str]:
        if family not in self.families:
            self.families.append(family)
        self.start_all()
        with self._lock:
            if family not in self._results:
                proc = self._procs[family]
                try:
                    out, err = proc.communicate(timeout=RUN_TIMEOUT_S)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    out, err = proc.communicate()
                    err += f"\n[driver killed after {RUN_TIMEOUT_S} s]"
                lines = {}
                for raw in out.splitlines():
                    if raw.startswith(MARK):
                        line = json.loads(raw[len(MARK):])
                        lines[line["case"]] = line
                self._results[family] = (proc.returncode, lines, err)
            return self._results[family]

    def stop(self) -> None:
        for proc in self._procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.communicate()


pytestmark = pytest.mark.xdist_group("instrumentations")  # one process makes the module fixtures (make test: loadgroup)


@pytest.fixture(scope="module")
def fake():
    with FakeProvider() as provider:
        yield provider


@pytest.fixture(scope="module")
def runs(fake, request):
    selected = {item.callspec.params["family"] for item in request.session.items
                if item.module is sys.modules[__name__] and "family" in getattr(getattr(item, "callspec", None), "params", {})}
    r = Runs(fake, [family for family in FAMILIES if family in selected])
    yield r
    r.stop()


# --- ground truth, from what the provider served -----------------------------------------------------

def ground_truth(family: str, case: str, served: dict) -> dict:
    """The one event meterline should make of this call, from the provider's own usage record."""
    api = served["api"]
    truth = {"provider": "anthropic" if api == "messages" else "openai", "tenant_id": tenant_of(case), "team": team_of(family)}
    zero = {"input_tokens": 0, "cache_read_tokens": 0, "cache_write_tokens": 0, "output_tokens": 0, "reasoning_tokens": 0}
    if served["status"] == 429:  # nothing served, nothing billed; the model is the one asked for
        return {**truth, "model": served["requested_model"], **zero, "status": "rate_limited"}
    truth |= {"model": served["model"], "status": "ok"}
    if not served["usage_sent"]:  # the provider counted tokens but never told the client
        return {**truth, **zero, "usage_missing": True}
    u = served["usage"]
    if api == "chat":
        tokens = {"input_tokens": u["prompt_tokens"], "cache_read_tokens": u["prompt_tokens_details"]["cached_tokens"],
                  "cache_write_tokens": 0, "output_tokens": u["completion_tokens"],
                  "reasoning_tokens": u["completion_tokens_details"]["reasoning_tokens"]}
    elif api == "responses":
        tokens = {"input_tokens": u["input_tokens"], "cache_read_tokens": u["input_tokens_details"]["cached_tokens"],
                  "cache_write_tokens": u["input_tokens_details"]["cache_write_tokens"], "output_tokens": u["output_tokens"],
                  "reasoning_tokens": u["output_tokens_details"]["reasoning_tokens"]}
    else:  # Anthropic: input_tokens is only the uncached part
        tokens = {"input_tokens": u["input_tokens"] + u["cache_read_input_tokens"] + u["cache_creation_input_tokens"],
                  "cache_read_tokens": u["cache_read_input_tokens"], "cache_write_tokens": u["cache_creation_input_tokens"],
                  "output_tokens": u["output_tokens"],
                  "reasoning_tokens": (u.get("output_tokens_details") or {}).get("thinking_tokens", 0)}
    return {**truth, **tokens, "usage_missing": False}


def _usage_missing(event: dict):
    if "usage_missing" in event:
        return event["usage_missing"]
    if "usage" in event:
        return event["usage"] == "missing"
    return "<UsageEvent has no usage_missing/usage field>"


def _project(event: dict, keys) -> dict:
    return {k: (_usage_missing(event) if k == "usage_missing" else event.get(k, f"<no field {k}>")) for k in keys}


def _library_spans(line: dict) -> list[dict]:
    return [s for s in line["spans"] if s["scope"] != "agent"]


def _describe(line: dict) -> str:
    """The raw spans, compact: what to read when a mapping is wrong."""
    out = []
    for s in line["spans"]:
        out.append(f"  span {s['name']!r} scope={s['scope']} id={s['span_id']} parent={s['parent_id']} status={s['status']}")
        for k, v in s["attributes"].items():
            if not (isinstance(v, str) and len(v) > 120):
                out.append(f"      {k} = {v!r}")
        for e in s["events"]:
            out.append(f"      event {e['name']} {e['attributes']}")
    out += [f"  log: {entry}" for entry in line["log"]]
    return "\n".join(out)


def _integers(spans: list[dict]) -> set[int]:
    found = set()
    for s in spans:
        for v in list(s["attributes"].values()) + [v for e in s["events"] for v in e["attributes"].values()]:
            for item in (v if isinstance(v, list) else [v]):
                if isinstance(item, int) and not isinstance(item, bool):
                    found.add(item)
    return found


@pytest.mark.parametrize(("family", "case"), CASES, ids=[f"{f}-{c}" for f, c in CASES])
def test_each_call_is_one_event_with_the_providers_numbers(family, case, runs, fake):
    rc, lines, stderr = runs.get(family)
    assert case in lines, f"driver for {family} printed nothing for {case} (rc={rc}):\n{stderr[-4000:]}"
    line = lines[case]
    served = fake.served.get((family, case), [])
    assert len(served) == 1, f"{family}/{case}: the provider answered {len(served)} requests (retries are off): {served}"
    served = served[0]

    # the application saw what the provider answered
    error = line["error"]
    if served["status"] == 429:
        assert error and error["type"] in RATE_LIMIT_ERRORS, f"{family}/{case}: the client did not raise a rate-limit error: {error}"
    else:
        assert error is None, f"{family}/{case}: the client raised:\n{error and error['traceback']}"

    truth = ground_truth(family, case, served)
    keys = list(truth)
    expected = [truth]
    limitation = LIMITATIONS.get((family, case))
    if limitation:
        reason, differs = limitation
        spans = _library_spans(line)
        if differs is None:
            assert spans == [], f"limitation '{reason}' no longer holds: the libraries emitted spans\n{_describe(line)}"
            expected = []
        else:
            for field, value in differs.items():
                if field == "model":
                    assert truth["model"] not in json.dumps(spans), (
                        f"limitation '{reason}' no longer holds: {truth['model']!r} is on a span\n{_describe(line)}")
                else:
                    assert truth[field] not in _integers(spans), (
                        f"limitation '{reason}' no longer holds: {field}={truth[field]} is on a span\n{_describe(line)}")
            expected = [{**truth, **differs}]

    actual = [_project(e, keys) for e in line["events"]]
    assert actual == expected, (
        f"{family}/{case}: metered {len(actual)} event(s), expected {len(expected)}"
        + (f" (limitation: {limitation[0]})" if limitation else "")
        + f"\nprovider served: {json.dumps(served)}\nraw spans:\n{_describe(line)}")


def test_the_fake_provider_counts_differ_per_case():
    """A swapped case or field shows only when no two numbers are alike."""
    from fakeprovider import USAGE

    numbers = [v for usage in USAGE.values() for v in usage.values() if v]
    assert len(numbers) == len(set(numbers))
