"""`kat-jax serve`: the built-in engine as an OpenAI-compatible /v1/completions endpoint.

POST /v1/completions {"prompt": [ids] or [[ids], ...], "max_tokens", "temperature", "top_p",
"top_k", "n", "seed", "stop_token_ids"} -> {"choices": [{"index", "text", "token_ids",
"logprobs": {"tokens": ["token_id:N", ...], "token_logprobs": [...], "entropies": [...]},
"finish_reason": "stop" | "length"}], "usage": {...}}. GET /v1/models lists the one model.
Concurrent requests are batched: continuously by the built-in JaxEngine (its prefix cache shares
prompts across requests), merged per round by BatchingEngine for other engines.
Binds to 127.0.0.1 by default.
Bad requests get HTTP 400 with a message naming the field.

routes: more endpoints, each an object with handle(method, path, headers, body: bytes) ->
(HTTP code, JSON object, or a list of them: server-sent events) or None (not its path), asked in
order before the built-in ones (the
chat proxy of kat_jax.flow.proxy mounts /v1/chat/completions and the session routes this way).
"""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from kat_jax.rollout.engine import BatchingEngine
from kat_jax.rollout.sampler import SamplingParams


def _params(body: dict) -> tuple[list[list[int]], SamplingParams, int]:
    prompt = body.get("prompt")
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt):
        prompts = [prompt]
    elif isinstance(prompt, list) and prompt and all(
            isinstance(p, list) and p and all(isinstance(t, int) for t in p) for p in prompt):
        prompts = prompt
    else:
        raise ValueError("'prompt' must be a non-empty list of token ids (or a list of them); "
                         "text prompts are not accepted: tokenize on the client")
    try:
        sp = SamplingParams(temperature=float(body.get("temperature", 1.0)),
                            top_p=float(body.get("top_p", 1.0)), top_k=int(body.get("top_k", 0)),
                            max_new_tokens=int(body.get("max_tokens", 16)),
                            stop_tokens=tuple(int(t) for t in body.get("stop_token_ids") or ()),
                            seed=int(body.get("seed", 0)))
    except (TypeError, ValueError) as e:
        raise ValueError(f"bad sampling parameters: {e}") from None
    n = int(body.get("n", 1))
    if n < 1:
        raise ValueError("'n' must be >= 1")
    return prompts, sp, n


def make_server(engine, host: str = "127.0.0.1", port: int = 0, model_name: str = "kat_jax",
                tokenizer=None, routes=()) -> ThreadingHTTPServer:
    batching = engine if getattr(engine, "continuous_batching", False) or isinstance(
        engine, BatchingEngine) else BatchingEngine(engine)

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, fmt, *args):  # quiet
            pass

        def _send(self, code: int, obj: dict | list) -> None:
            kind = "application/json"
            if isinstance(obj, list):  # server-sent events, written at once, then [DONE]
                kind = "text/event-stream"
                data = "".join(f"data: {json.dumps(e)}\n\n" for e in obj).encode() + \
                    b"data: [DONE]\n\n"
            else:
                data = json.dumps(obj).encode()
            self.send_response(code)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _route(self, method: str, body: bytes = b"") -> bool:
            for route in routes:
                try:
                    answer = route.handle(method, self.path, self.headers, body)
                except Exception as e:  # noqa: BLE001 - the client gets the error, the server lives
                    answer = 500, {"error": {"message": f"{type(e).__name__}: {e}",
                                             "type": "server_error"}}
                if answer is not None:
                    self._send(*answer)
                    return True
            return False

        def do_GET(self):
            if self._route("GET"):
                return
            if self.path.rstrip("/") == "/v1/models":
                self._send(200, {"object": "list", "data": [{"id": model_name, "object": "model"}]})
            else:
                self._send(404, {"error": {"message": f"no route {self.path}"}})

        def do_POST(self):
            raw = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            if self._route("POST", raw):
                return
            if self.path.rstrip("/") != "/v1/completions":
                self._send(404, {"error": {"message": f"no route {self.path}"}})
                return
            try:
                body = json.loads(raw)
                prompts, sp, n = _params(body)
                out = batching.generate(prompts, sp, n=n, seeds=[sp.seed] * len(prompts))
            except (ValueError, json.JSONDecodeError) as e:
                self._send(400, {"error": {"message": str(e), "type": "invalid_request_error"}})
                return
            choices = []
            for i, gens in enumerate(out):
                for j, g in enumerate(gens):
                    choices.append({
                        "index": i * n + j,
                        "text": tokenizer.decode(g.tokens) if tokenizer is not None else "",
                        "token_ids": g.tokens,
                        "logprobs": {"tokens": [f"token_id:{t}" for t in g.tokens],
                                     "token_logprobs": g.logprobs, "entropies": g.entropies},
                        "finish_reason": g.finish_reason})
            completion = sum(len(c["token_ids"]) for c in choices)
            self._send(200, {"id": f"cmpl-{time.time_ns()}", "object": "text_completion",
                             "created": int(time.time()), "model": model_name, "choices": choices,
                             "usage": {"prompt_tokens": sum(len(p) for p in prompts),
                                       "completion_tokens": completion}})

    return ThreadingHTTPServer((host, port), Handler)


def serve_in_thread(engine, host: str = "127.0.0.1", port: int = 0, **kw):
    """(server, base_url) with the server running in a daemon thread (tests, notebooks)."""
    server = make_server(engine, host, port, **kw)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://{host}:{server.server_address[1]}"
