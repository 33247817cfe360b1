"""The OpenAI-compatible simulator server: request parsing (unit) and a real subprocess (slow).

The slow test starts `python -m launch.serve_simulator` on port 0 with tiny-llama (its own Ray and vLLM), talks to it
with the `openai` client and with `OpenAISimulator`, and always terminates it.
"""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
import threading

import pytest

from launch.serve_simulator import BadRequest, completion_body, parse_chat_request
from simulator.base import SearchContext
from tests.conftest import REPO_ROOT


def test_parse_chat_request_accepts_string_and_list_content():
    body = {"model": "", "messages": [{"role": "system", "content": ""},
                                      {"role": "user", "content": [{"type": "text", "text": "a"},
                                                                   {"type": "text", "text": "b"}]}],
            "max_tokens": 600, "temperature": 0.8}
    messages, sampling = parse_chat_request(body)
    assert messages == [{"role": "system", "content": ""}, {"role": "user", "content": "ab"}]
    assert sampling == {"max_tokens": 600, "temperature": 0.8}
    _, sampling = parse_chat_request({"messages": [{"role": "user", "content": "x"}], "max_completion_tokens": 5,
                                      "stop": "\n"})
    assert sampling == {"max_tokens": 5, "stop": ["\n"]}


@pytest.mark.parametrize("body, needle", [
    ([], "JSON object"),
    ({"messages": []}, "non-empty"),
    ({"messages": [{"content": "x"}]}, "role"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "only text parts"),
    ({"messages": [{"role": "user", "content": "x"}], "stream": True}, "streaming"),
    ({"messages": [{"role": "user", "content": "x"}], "temperature": "hot"}, "temperature"),
    ({"messages": [{"role": "user", "content": "x"}], "max_tokens": 0}, "max_tokens"),
])
def test_parse_chat_request_rejects_bad_bodies(body, needle):
    with pytest.raises(BadRequest, match=needle):
        parse_chat_request(body)


def test_completion_body_has_the_openai_shape():
    body = completion_body({"text": "Doc 1: x", "num_tokens": 3, "prompt_tokens": 7, "finish_reason": "length"}, "m")
    assert body["object"] == "chat.completion" and body["choices"][0]["message"]["content"] == "Doc 1: x"
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["usage"] == {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10}


class _Server:
    """A `serve_simulator` subprocess whose output is drained by a thread (so a full pipe never blocks it)."""

    def __init__(self, args: list[str]) -> None:
        env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"}
        self.proc = subprocess.Popen([sys.executable, "-m", "launch.serve_simulator", *args], cwd=REPO_ROOT, env=env,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.lines: list[str] = []
        self.url: str | None = None
        self._ready = threading.Event()
        threading.Thread(target=self._drain, daemon=True).start()

    def _drain(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line)
            match = re.search(r"listening on (http://\S+)", line)
            if match and self.url is None:
                self.url = match.group(1)
                self._ready.set()
        self._ready.set()  # the process ended

    def wait_ready(self, timeout: float) -> str:
        self._ready.wait(timeout)
        assert self.url, "server did not start:\n" + "".join(self.lines[-60:])
        return self.url

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()  # uvicorn exits cleanly on SIGTERM, and the server then stops its Ray instance
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=30)


@pytest.mark.slow
def test_served_simulator_answers_openai_clients(tiny_llama_path):
    import httpx
    from openai import OpenAI

    from simulator.simulated import OpenAISimulator

    server = _Server(["--model", str(tiny_llama_path), "--port", "0", "--max-tokens", "32", "--max-model-len", "1024",
                      "--request-timeout", "300"])
    try:
        url = server.wait_ready(timeout=600)
        assert url.startswith("http://127.0.0.1:")

        client = OpenAI(base_url=f"{url}/v1", api_key="EMPTY", timeout=300, max_retries=0)
        response = client.chat.completions.create(
            model="", messages=[{"role": "system", "content": ""}, {"role": "user", "content": "Query: test"}],
            max_tokens=16, temperature=0.8,
        )
        assert response.choices[0].message.content and response.usage.completion_tokens == 16
        assert response.usage.prompt_tokens > 0

        bad = httpx.post(f"{url}/v1/chat/completions", json={"messages": "nope"}, timeout=60)
        assert bad.status_code == 400 and "messages" in bad.json()["error"]["message"]

        engine = OpenAISimulator([f"{url}/v1"], mode="prompt", max_tokens=32, timeout_s=300, retries=1)
        ctx = SearchContext(question="Where was Ada born?", golden_answers=("Norhaven",), noise_prob=0.0, seed=0)
        result = asyncio.run(engine.search("Ada birthplace", ctx))
        assert not result.meta.failed and result.documents and result.meta.num_tokens > 0
        assert result.meta.noisy is False and result.meta.engine == "openai"

        health = httpx.get(f"{url}/health", timeout=60).json()
        assert health["status"] == "ok" and health["calls"] == 2 and health["failures"] == 0
    finally:
        server.stop()
    assert server.proc.returncode is not None
