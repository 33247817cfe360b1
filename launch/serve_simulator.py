"""Serve the simulation LLM behind an OpenAI-compatible API: `POST /v1/chat/completions`, `GET /health`.

    python -m launch.serve_simulator --model smollm2-135m-instruct --port 6001 [--servers 2] [--mode prompt]

This replaces the original's `python -m sglang.launch_server ... --port 6001`: it starts a local Ray instance, N vLLM
simulator servers and the pool that routes over them (`simulator/pool.py`: least-outstanding routing, timeouts,
bounded retries, restarts), and puts a small FastAPI app in front. So the `openai` client, curl, our
`OpenAISimulator` and the original ZeroSearch client (which sends `content` as a list of text parts) all work, and
other machines can share one simulator.

The request's `temperature`, `top_p`, `max_tokens` (or `max_completion_tokens`), `seed` and `stop` are honoured;
unset ones default to the simulator's (0.8 and 600). The server applies the model's chat template to the messages as
given. A call that fails on every server gets a 503 with an OpenAI-style error body, never a hang. `GET /health`
returns the pool's counters (calls, tokens, latency percentiles, failures, restarts).

The server binds 127.0.0.1 unless `--host` says otherwise. With `--port 0` it picks a free port. It prints
`serve_simulator: listening on http://HOST:PORT` once every server has loaded its model and the socket is bound.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import time
import uuid
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from simulator.config import SIMULATOR_MODES, SimulatorConfig
from simulator.server import flatten_content


class BadRequest(ValueError):
    """A request the server cannot serve; the message goes back with status 400."""


def parse_chat_request(body: Any) -> tuple[list[dict[str, str]], dict[str, Any]]:
    """Validate a chat-completions body. Returns (messages with flattened text content, sampling overrides)."""
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object with 'messages'")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise BadRequest("'messages' must be a non-empty list of {'role', 'content'} objects")
    flat = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise BadRequest(f"messages[{i}] must be an object with a string 'role'")
        try:
            flat.append({"role": message["role"], "content": flatten_content(message.get("content"))})
        except ValueError as e:
            raise BadRequest(f"messages[{i}].content: {e}") from None
    if body.get("stream"):
        raise BadRequest("streaming is not supported; send 'stream': false")
    if body.get("n", 1) != 1:
        raise BadRequest("only n=1 is supported")

    sampling: dict[str, Any] = {}
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    for key, value, kind in [
        ("temperature", body.get("temperature"), (int, float)),
        ("top_p", body.get("top_p"), (int, float)),
        ("max_tokens", max_tokens, int),
        ("seed", body.get("seed"), int),
    ]:
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, kind):
            raise BadRequest(f"'{key}' must be a number, got {value!r:.50}")
        sampling[key] = value
    if "max_tokens" in sampling and sampling["max_tokens"] < 1:
        raise BadRequest("'max_tokens' must be at least 1")
    stop = body.get("stop")
    if stop is not None:
        stop = [stop] if isinstance(stop, str) else stop
        if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
            raise BadRequest("'stop' must be a string or a list of strings")
        sampling["stop"] = stop
    return flat, sampling


def completion_body(reply: dict[str, Any], model: str) -> dict[str, Any]:
    """The OpenAI `chat.completion` object for one pool reply."""
    prompt_tokens, completion_tokens = int(reply.get("prompt_tokens", 0)), int(reply.get("num_tokens", 0))
    return {
        "id": f"chatcmpl-{uuid.uuid4().hex}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [{
            "index": 0,
            "message": {"role": "assistant", "content": reply.get("text", "")},
            "finish_reason": reply.get("finish_reason", "stop"),
        }],
        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                  "total_tokens": prompt_tokens + completion_tokens},
    }


def _error(status: int, message: str, kind: str) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "code": status}}, status_code=status)


def create_app(pool: Any, cfg: SimulatorConfig) -> FastAPI:
    """The HTTP front end of a `SimulatorPoolActor`. Every call to the pool is bounded by a timeout."""
    app = FastAPI(title="zerosearch-ray simulator")
    call_timeout_s = cfg.max_attempts * cfg.request_timeout_s + 30  # the pool gives up before this

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> JSONResponse:
        try:
            body = await request.json()
        except ValueError:
            return _error(400, "the request body is not valid JSON", "invalid_request_error")
        try:
            messages, sampling = parse_chat_request(body)
        except BadRequest as e:
            return _error(400, str(e), "invalid_request_error")
        try:
            reply = await asyncio.wait_for(pool.generate.remote(messages, None, sampling), call_timeout_s)
        except asyncio.TimeoutError:
            return _error(503, f"the simulator pool did not answer within {call_timeout_s:g}s", "server_error")
        if reply.get("failed"):
            return _error(503, f"no simulator server could serve the request: {reply.get('error', '')}",
                          "server_error")
        return JSONResponse(completion_body(reply, body.get("model") or cfg.model))

    @app.get("/health")
    async def health() -> JSONResponse:
        try:
            stats = await asyncio.wait_for(pool.stats.remote(), cfg.health_timeout_s)
        except Exception as e:  # noqa: BLE001 - the pool actor is gone or stuck
            return JSONResponse({"status": "down", "error": f"{type(e).__name__}: {e}"}, status_code=503)
        status = "ok" if stats["servers_alive"] == len(stats["servers"]) else "degraded"
        return JSONResponse({"status": status, "model": cfg.model, "mode": cfg.mode, **stats},
                            status_code=200 if stats["servers_alive"] else 503)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": cfg.model, "object": "model", "owned_by": "zerosearch-ray"}]}

    return app


def _init_ray(ray: Any, address: str, kwargs: dict[str, Any], attempts: int = 3) -> None:
    """``ray.init`` with a bounded retry: on an overloaded machine the local raylet can miss Ray's fixed 30 s start-up
    window ("The current node timed out during startup"), and a second try usually succeeds."""
    for attempt in range(1, attempts + 1):
        try:
            ray.init(address=address, **kwargs)
            return
        except Exception as e:  # noqa: BLE001 - Ray raises a bare Exception for this
            if attempt == attempts or "timed out during startup" not in str(e):
                raise
            logging.warning("ray.init failed (%s); retrying (%d/%d)", e, attempt, attempts)
            ray.shutdown()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Serve the simulation LLM behind an OpenAI-compatible API.")
    parser.add_argument("--model", default="smollm2-135m-instruct", help="asset name, HF folder or hub id")
    parser.add_argument("--port", type=int, default=6001, help="0 picks a free port (default: 6001, ZeroSearch's)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, this machine only)")
    parser.add_argument("--servers", type=int, default=1, help="vLLM servers behind the pool")
    parser.add_argument("--mode", default="prompt", choices=SIMULATOR_MODES, help="recorded in /health")
    parser.add_argument("--max-tokens", type=int, default=600, help="default max_tokens of a request")
    parser.add_argument("--temperature", type=float, default=0.8, help="default temperature of a request")
    parser.add_argument("--max-model-len", type=int, default=2048)
    parser.add_argument("--cpus-per-server", type=float, default=1.0)
    parser.add_argument("--gpus-per-server", type=float, default=0.0)
    parser.add_argument("--tensor-parallel-size", type=int, default=1)
    parser.add_argument("--kvcache-gb", type=int, default=1, help="VLLM_CPU_KVCACHE_SPACE of each CPU server")
    parser.add_argument("--request-timeout", type=float, default=120.0, help="seconds per attempt on one server")
    parser.add_argument("--max-attempts", type=int, default=3)
    parser.add_argument("--cache-size", type=int, default=0, help="pool LRU cache entries (0 = off)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--ray-address", default="local", help="'local' starts a private Ray instance")
    parser.add_argument("--num-cpus", type=int, default=None, help="CPUs of the private Ray instance")
    parser.add_argument("--log-level", default="warning", choices=["debug", "info", "warning", "error"])
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper())

    import ray

    from launch.assets import resolve_simulator
    from launch.listen import listen
    from simulator.pool_actor import create_simulator_pool

    cfg = SimulatorConfig(
        model=args.model, mode=args.mode, num_servers=args.servers, max_tokens=args.max_tokens,
        temperature=args.temperature, max_model_len=args.max_model_len, cpus_per_server=args.cpus_per_server,
        gpus_per_server=args.gpus_per_server, tensor_parallel_size=args.tensor_parallel_size,
        kvcache_gb=args.kvcache_gb, request_timeout_s=args.request_timeout, max_attempts=args.max_attempts,
        cache_size=args.cache_size, seed=args.seed,
    )
    simulator = resolve_simulator(cfg)  # a model that is not there is named before Ray starts
    sock = listen(args.host, args.port, "serve_simulator")  # and a busy port before the servers load
    num_cpus = args.num_cpus or max(2, int(args.servers * args.cpus_per_server + 0.999))
    init_kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": args.log_level == "debug"}
    if args.ray_address == "local":
        init_kwargs["num_cpus"] = num_cpus
    _init_ray(ray, args.ray_address, init_kwargs)
    try:
        pool = create_simulator_pool(simulator)  # waits until every server has loaded its model
        host, port = sock.getsockname()[:2]
        print(f"serve_simulator: listening on http://{host}:{port} ({cfg.model}, {cfg.num_servers} server(s))",
              flush=True)
        config = uvicorn.Config(create_app(pool, cfg), log_level=args.log_level, access_log=args.log_level == "debug")
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        ray.shutdown()


if __name__ == "__main__":
    main()
