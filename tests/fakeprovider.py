"""A fake LLM provider on 127.0.0.1 for tests that drive the real client libraries.

It speaks enough of three APIs for the official clients (openai, anthropic, langchain-openai) and
the instrumentations around them to run unchanged:

- OpenAI Chat Completions, `POST .../v1/chat/completions`: a `chat.completion`, or with `stream: true`
  `chat.completion.chunk` server-sent events ending in `data: [DONE]`; the usage chunk (empty
  `choices`) only when the request asks `stream_options: {"include_usage": true}`, as OpenAI does.
- OpenAI Responses, `POST .../v1/responses`: a `response`, or the `response.*` event stream ending in
  `response.completed`, which carries the usage.
- Anthropic Messages, `POST .../v1/messages`: a `message`, or the `message_start` /
  `content_block_*` / `ping` / `message_delta` / `message_stop` event stream.
- A 429 in each API's own error shape (and `retry-after`) for a case whose name ends in `_429`.

The path chooses the case: a client's base URL is `<url>/<run>/<case>/v1` (Anthropic's client adds
`/v1` itself, so its base URL is `<url>/<run>/<case>`). Each case has its own token counts
(`USAGE`), all different, so an event metered from the wrong call or the wrong field shows. Aliases
resolve to dated model names (`MODELS`), as the real APIs answer.

`served[(run, case)]` records every answer: the API, the requested and the returned model, the HTTP
status, whether usage reached the client, and the usage exactly as the provider counted it, in
the provider's own shape. That is the ground truth a test compares meterline's events with.
"""
from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

# What the provider answers for an alias (as the real APIs do: ask gpt-4o, get the dated snapshot).
MODELS = {
    "o4-mini": "o4-mini-2025-04-16",
    "gpt-4o": "gpt-4o-2024-08-06",
    "gpt-4o-mini": "gpt-4o-mini-2024-07-18",
    "o3": "o3-2025-04-16",
    "gpt-4.1": "gpt-4.1-2025-04-14",
    "gpt-4.1-mini": "gpt-4.1-mini-2025-04-14",
    "gpt-4.1-nano": "gpt-4.1-nano-2025-04-14",
    "claude-sonnet-4-5": "claude-sonnet-4-5-20250929",
    "claude-haiku-4-5": "claude-haiku-4-5-20251001",
    "claude-opus-4-1": "claude-opus-4-1-20250805",
}

# Token counts per case, in each API's own terms. OpenAI: prompt/input includes the cached tokens,
# completion/output includes the reasoning tokens. Anthropic: input_tokens excludes cache reads and
# writes; output_tokens includes thinking tokens.
USAGE: dict[str, dict[str, int]] = {
    "chat": {"prompt": 1517, "cached": 1024, "completion": 389, "reasoning": 256},
    "chat_stream": {"prompt": 2231, "cached": 1792, "completion": 147, "reasoning": 64},
    "chat_stream_no_usage": {"prompt": 611, "cached": 384, "completion": 53, "reasoning": 0},
    "responses": {"input": 3109, "cached": 2048, "output": 702, "reasoning": 512},
    "responses_stream": {"input": 877, "cached": 640, "output": 91, "reasoning": 48},
    "anthropic": {"input": 23, "cache_read": 4096, "cache_write": 1310, "output": 455, "thinking": 301},
    "anthropic_stream": {"input": 41, "cache_read": 2816, "cache_write": 517, "output": 128, "thinking": 0},
    "anthropic_stream_helper": {"input": 57, "cache_read": 1408, "cache_write": 1984, "output": 77, "thinking": 0},
    "lc_invoke": {"prompt": 1333, "cached": 1152, "completion": 211, "reasoning": 0},
    "lc_stream": {"prompt": 949, "cached": 768, "completion": 66, "reasoning": 0},
}

REPLY = "Metered, priced and attributed."
OPENAI_FINGERPRINT = "fp_f33640a400"


def _words(text: str) -> list[str]:
    parts = text.split(" ")
    return [p if i == len(parts) - 1 else p + " " for i, p in enumerate(parts)]


class FakeProvider:
    """`with FakeProvider() as fake:` serves on a free port of 127.0.0.1 until the block ends."""

    def __init__(self):
        self.served: dict[tuple[str, str], list[dict[str, Any]]] = {}
        self._lock = threading.Lock()
        self._counter = 0
        provider = self

        class Handler(_Handler):
            fake = provider

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="fakeprovider", daemon=True)

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> FakeProvider:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)

    def __enter__(self) -> FakeProvider:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def next_id(self) -> int:
        with self._lock:
            self._counter += 1
            return self._counter

    def record(self, run: str, case: str, entry: dict[str, Any]) -> None:
        with self._lock:
            self.served.setdefault((run, case), []).append(entry)


class _Handler(BaseHTTPRequestHandler):
    fake: FakeProvider
    protocol_version = "HTTP/1.1"  # keep-alive and chunked streams, like the real APIs

    def log_message(self, format, *args):  # noqa: A002 - quiet; the record is in `served`
        pass

    # --- plumbing --------------------------------------------------------------------------------

    def do_POST(self):  # noqa: N802 - http.server's name
        length = int(self.headers.get("content-length") or 0)
        try:
            body = json.loads(self.rfile.read(length) or b"{}")
        except ValueError:
            return self._json(400, {"error": {"message": "body is not JSON", "type": "invalid_request_error"}})
        parts = self.path.split("?", 1)[0].strip("/").split("/")
        # <run>/<case>/v1/<endpoint...>
        if len(parts) < 4 or parts[2] != "v1":
            return self._json(404, {"error": {"message": f"no route {self.path}", "type": "invalid_request_error"}})
        run, case, endpoint = parts[0], parts[1], "/".join(parts[3:])
        handler = {"chat/completions": self._chat, "responses": self._responses, "messages": self._messages}.get(endpoint)
        if handler is None:
            return self._json(404, {"error": {"message": f"no endpoint {endpoint}", "type": "invalid_request_error"}})
        handler(run, case, body)

    def _json(self, status: int, payload: dict, headers: dict[str, str] | None = None) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)

    def _start_stream(self, headers: dict[str, str]) -> None:
        self.send_response(200)
        self.send_header("content-type", "text/event-stream; charset=utf-8")
        self.send_header("cache-control", "no-cache")
        self.send_header("transfer-encoding", "chunked")
        for name, value in headers.items():
            self.send_header(name, value)
        self.end_headers()

    def _chunk(self, text: str) -> None:
        data = text.encode()
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        self.wfile.flush()

    def _sse(self, data: dict | str, event: str | None = None) -> None:
        payload = data if isinstance(data, str) else json.dumps(data)
        self._chunk((f"event: {event}\n" if event else "") + f"data: {payload}\n\n")

    def _end_stream(self) -> None:
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()

    def _entry(self, api: str, body: dict, **fields) -> dict[str, Any]:
        return {"api": api, "requested_model": body.get("model"), "stream": bool(body.get("stream")), **fields}

    def _rate_limited(self, run: str, case: str, api: str, body: dict) -> bool:
        if not case.endswith("_429"):
            return False
        n = self.fake.next_id()
        self.fake.record(run, case, self._entry(api, body, status=429, model=None, usage_sent=False, usage=None))
        if api == "messages":
            self._json(429, {"type": "error", "error": {"type": "rate_limit_error",
                                                        "message": "Number of request tokens has exceeded your per-minute rate limit"},
                             "request_id": f"req_011CRL{n:08d}"},
                       {"retry-after": "7", "request-id": f"req_011CRL{n:08d}", "x-should-retry": "true"})
        else:
            self._json(429, {"error": {"message": "Rate limit reached for requests per min (RPM): Limit 500, Used 500, Requested 1.",
                                       "type": "requests", "param": None, "code": "rate_limit_exceeded"}},
                       {"retry-after": "7", "x-request-id": f"req_{n:032x}", "x-ratelimit-remaining-requests": "0",
                        "x-should-retry": "true"})
        return True

    def _usage_of(self, case: str) -> dict[str, int]:
        if case not in USAGE:
            raise KeyError(f"fakeprovider: no usage for case {case!r}")
        return USAGE[case]

    # --- OpenAI Chat Completions -----------------------------------------------------------------

    def _chat(self, run: str, case: str, body: dict) -> None:
        if self._rate_limited(run, case, "chat", body):
            return
        u = self._usage_of(case)
        model = MODELS[body["model"]]
        n = self.fake.next_id()
        cid, created = f"chatcmpl-C{n:028d}", int(time.time())
        usage = {
            "prompt_tokens": u["prompt"], "completion_tokens": u["completion"], "total_tokens": u["prompt"] + u["completion"],
            "prompt_tokens_details": {"cached_tokens": u["cached"], "audio_tokens": 0},
            "completion_tokens_details": {"reasoning_tokens": u["reasoning"], "audio_tokens": 0,
                                          "accepted_prediction_tokens": 0, "rejected_prediction_tokens": 0},
        }
        headers = {"x-request-id": f"req_{n:032x}", "openai-processing-ms": "412", "openai-version": "2020-10-01"}
        if not body.get("stream"):
            self.fake.record(run, case, self._entry("chat", body, status=200, model=model, usage_sent=True, usage=usage))
            return self._json(200, {
                "id": cid, "object": "chat.completion", "created": created, "model": model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": REPLY, "refusal": None, "annotations": []},
                             "logprobs": None, "finish_reason": "stop"}],
                "usage": usage, "service_tier": "default", "system_fingerprint": OPENAI_FINGERPRINT,
            }, headers)
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        self.fake.record(run, case, self._entry("chat", body, status=200, model=model, usage_sent=include_usage,
                                                usage=usage, include_usage=include_usage))
        self._start_stream(headers)
        base = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
                "service_tier": "default", "system_fingerprint": OPENAI_FINGERPRINT}
        extra = {"usage": None} if include_usage else {}
        first = {"role": "assistant", "content": "", "refusal": None}
        self._sse({**base, "choices": [{"index": 0, "delta": first, "logprobs": None, "finish_reason": None}], **extra})
        for word in _words(REPLY):
            self._sse({**base, "choices": [{"index": 0, "delta": {"content": word}, "logprobs": None, "finish_reason": None}], **extra})
        self._sse({**base, "choices": [{"index": 0, "delta": {}, "logprobs": None, "finish_reason": "stop"}], **extra})
        if include_usage:
            self._sse({**base, "choices": [], "usage": usage})
        self._sse("[DONE]")
        self._end_stream()

    # --- OpenAI Responses ------------------------------------------------------------------------

    def _responses(self, run: str, case: str, body: dict) -> None:
        if self._rate_limited(run, case, "responses", body):
            return
        u = self._usage_of(case)
        model = MODELS[body["model"]]
        n = self.fake.next_id()
        rid, mid, created = f"resp_{n:048x}", f"msg_{n:048x}", int(time.time())
        usage = {
            "input_tokens": u["input"], "input_tokens_details": {"cached_tokens": u["cached"], "cache_write_tokens": 0},
            "output_tokens": u["output"], "output_tokens_details": {"reasoning_tokens": u["reasoning"]},
            "total_tokens": u["input"] + u["output"],
        }
        text_part = {"type": "output_text", "text": REPLY, "annotations": [], "logprobs": []}
        message = {"id": mid, "type": "message", "status": "completed", "role": "assistant", "content": [text_part]}
        output = ([{"id": f"rs_{n:048x}", "type": "reasoning", "summary": []}] if u["reasoning"] else []) + [message]

        def response(status: str, out: list, use: dict | None) -> dict:
            return {
                "id": rid, "object": "response", "created_at": created, "status": status, "background": False,
                "error": None, "incomplete_details": None, "instructions": None, "max_output_tokens": None,
                "model": model, "output": out, "parallel_tool_calls": True, "previous_response_id": None,
                "reasoning": {"effort": "medium" if u["reasoning"] else None, "summary": None},
                "service_tier": "default", "store": True, "temperature": 1.0, "text": {"format": {"type": "text"}, "verbosity": "medium"},
                "tool_choice": "auto", "tools": [], "top_p": 1.0, "truncation": "disabled", "usage": use,
                "user": None, "metadata": {},
            }

        headers = {"x-request-id": f"req_{n:032x}", "openai-processing-ms": "518", "openai-version": "2020-10-01"}
        self.fake.record(run, case, self._entry("responses", body, status=200, model=model, usage_sent=True, usage=usage))
        if not body.get("stream"):
            return self._json(200, response("completed", output, usage), headers)
        self._start_stream(headers)
        seq = iter(range(10_000))

        def event(kind: str, **fields) -> None:
            self._sse({"type": kind, "sequence_number": next(seq), **fields}, event=kind)

        event("response.created", response=response("in_progress", [], None))
        event("response.in_progress", response=response("in_progress", [], None))
        index = len(output) - 1
        for i, item in enumerate(output[:-1]):
            event("response.output_item.added", output_index=i, item=item)
            event("response.output_item.done", output_index=i, item=item)
        event("response.output_item.added", output_index=index,
              item={**message, "status": "in_progress", "content": []})
        event("response.content_part.added", item_id=mid, output_index=index, content_index=0,
              part={"type": "output_text", "text": "", "annotations": [], "logprobs": []})
        for word in _words(REPLY):
            event("response.output_text.delta", item_id=mid, output_index=index, content_index=0, delta=word, logprobs=[])
        event("response.output_text.done", item_id=mid, output_index=index, content_index=0, text=REPLY, logprobs=[])
        event("response.content_part.done", item_id=mid, output_index=index, content_index=0, part=text_part)
        event("response.output_item.done", output_index=index, item=message)
        event("response.completed", response=response("completed", output, usage))
        self._end_stream()

    # --- Anthropic Messages ----------------------------------------------------------------------

    def _messages(self, run: str, case: str, body: dict) -> None:
        if self._rate_limited(run, case, "messages", body):
            return
        u = self._usage_of(case)
        model = MODELS[body["model"]]
        n = self.fake.next_id()
        mid = f"msg_01{n:022d}"
        usage: dict[str, Any] = {
            "input_tokens": u["input"], "cache_creation_input_tokens": u["cache_write"],
            "cache_read_input_tokens": u["cache_read"],
            "cache_creation": {"ephemeral_5m_input_tokens": u["cache_write"], "ephemeral_1h_input_tokens": 0},
            "output_tokens": u["output"], "service_tier": "standard",
        }
        if u["thinking"]:
            usage["output_tokens_details"] = {"thinking_tokens": u["thinking"]}
        content: list[dict] = []
        if u["thinking"]:
            content.append({"type": "thinking", "thinking": "The user wants a one-line status.",
                            "signature": "EqQBCkYIBRgCKkB" + "A" * 40})
        content.append({"type": "text", "text": REPLY})
        headers = {"request-id": f"req_011CT{n:08d}", "anthropic-organization-id": "6b7e3f1c-0000-4000-8000-000000000001"}
        self.fake.record(run, case, self._entry("messages", body, status=200, model=model, usage_sent=True, usage=usage))
        if not body.get("stream"):
            return self._json(200, {"id": mid, "type": "message", "role": "assistant", "model": model, "content": content,
                                    "stop_reason": "end_turn", "stop_sequence": None, "usage": usage}, headers)
        self._start_stream(headers)

        def event(kind: str, **fields) -> None:
            self._sse({"type": kind, **fields}, event=kind)

        # message_start carries the input side and a placeholder output count; message_delta the final output.
        start_usage = {k: v for k, v in usage.items() if k != "output_tokens_details"} | {"output_tokens": 1}
        event("message_start", message={"id": mid, "type": "message", "role": "assistant", "model": model, "content": [],
                                        "stop_reason": None, "stop_sequence": None, "usage": start_usage})
        for i, block in enumerate(content):
            if block["type"] == "thinking":
                event("content_block_start", index=i, content_block={"type": "thinking", "thinking": "", "signature": ""})
                event("content_block_delta", index=i, delta={"type": "thinking_delta", "thinking": block["thinking"]})
                event("content_block_delta", index=i, delta={"type": "signature_delta", "signature": block["signature"]})
            else:
                event("content_block_start", index=i, content_block={"type": "text", "text": ""})
                if i == 0:
                    event("ping")
                for word in _words(block["text"]):
                    event("content_block_delta", index=i, delta={"type": "text_delta", "text": word})
            event("content_block_stop", index=i)
        delta_usage: dict[str, Any] = {"output_tokens": u["output"]}
        if u["thinking"]:
            delta_usage["output_tokens_details"] = {"thinking_tokens": u["thinking"]}
        event("message_delta", delta={"stop_reason": "end_turn", "stop_sequence": None}, usage=delta_usage)
        event("message_stop")
        self._end_stream()
