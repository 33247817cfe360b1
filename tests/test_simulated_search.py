"""SimulatedSearch and the search-engine factory.

Unit tests use a fake pool that records prompts (the pool is below the code under test). The slow test runs the real
pool: Ray actors holding vLLM CPU engines with tiny-llama.
"""

from __future__ import annotations

import asyncio

import pytest

from simulator.base import NO_INFORMATION, SearchContext
from simulator.config import SearchConfig, SimulatorConfig
from simulator.simulated import OpenAISimulator, SimulatedSearch, build_search_engine, draw_useful, normalize_openai_url

REPLY = "Doc 1: first document.\n\nDoc 2: second one.\nDoc 3: third.\nDoc 4: four.\nDoc 5: five.\nDoc 6: six."


class RecordingPool:
    """A fake pool: remembers every prompt and cache key and answers with a fixed reply."""

    def __init__(self, reply: dict | None = None) -> None:
        self.calls: list[tuple[str, tuple]] = []
        self.reply = reply or {"text": REPLY, "num_tokens": 42, "failed": False, "error": "", "cache_hit": False}

    async def generate(self, prompt, cache_key=None):
        self.calls.append((prompt, cache_key))
        return dict(self.reply)


class HangingPool:
    async def generate(self, prompt, cache_key=None):
        await asyncio.sleep(10**9)


def _search(engine, queries, ctxs):
    async def main():
        return [await engine.search(q, c) for q, c in zip(queries, ctxs)]

    return asyncio.run(main())


def test_noise_prob_zero_is_always_useful_and_one_always_noisy():
    queries = [f"query {i}" for i in range(200)]
    assert all(draw_useful(SearchContext(noise_prob=0.0, seed=s), q) for s in range(3) for q in queries)
    assert not any(draw_useful(SearchContext(noise_prob=1.0, seed=s), q) for s in range(3) for q in queries)
    assert all(draw_useful(SearchContext(noise_prob=0.0), q) for q in queries)  # unseeded too


def test_same_seed_gives_the_same_draws_and_the_rate_follows_noise_prob():
    queries = [f"query {i}" for i in range(400)]
    first = [draw_useful(SearchContext(noise_prob=0.5, seed=7), q) for q in queries]
    again = [draw_useful(SearchContext(noise_prob=0.5, seed=7), q) for q in queries]
    other = [draw_useful(SearchContext(noise_prob=0.5, seed=8), q) for q in queries]
    assert first == again and first != other
    assert 150 < sum(first) < 250  # about half; a loose bound on a seeded, fixed sample (deterministic)


def test_prompt_carries_the_episodes_own_question_and_answer_and_meta_records_the_draw():
    pool = RecordingPool()
    engine = SimulatedSearch(pool, mode="prompt")
    ctx_a = SearchContext(question="Where was Ada Quill born?", golden_answers=("Norhaven", "NH"), noise_prob=0.0,
                          seed=1)
    ctx_b = SearchContext(question="Who founded Brightwell?", golden_answers=("Tom Reyes",), noise_prob=0.0, seed=2)
    ra, rb = _search(engine, ["Ada Quill birthplace", "Brightwell founder"], [ctx_a, ctx_b])

    (prompt_a, key_a), (prompt_b, key_b) = pool.calls
    assert 'question: "Where was Ada Quill born?" whose answer is Norhaven.' in prompt_a
    assert "Query: Ada Quill birthplace\nUseful Output:\n" in prompt_a
    assert "Brightwell" not in prompt_a and "Ada Quill born" not in prompt_b
    assert 'question: "Who founded Brightwell?" whose answer is Tom Reyes.' in prompt_b
    assert key_a == ("Ada Quill birthplace", True, "Where was Ada Quill born?", "Norhaven")
    assert ra.meta.noisy is False and ra.meta.engine == "simulated" and ra.meta.num_tokens == 42
    assert ra.documents == ["first document.", "second one.", "third.", "four.", "five."]
    assert ra.text.startswith("Doc 1: first document.\nDoc 2: second one.")
    assert not ra.meta.failed


def test_noisy_draw_uses_the_noisy_template():
    pool = RecordingPool()
    engine = SimulatedSearch(pool, mode="sft")
    (result,) = _search(engine, ["q"], [SearchContext(question="Q?", golden_answers=("A",), noise_prob=1.0, seed=0)])
    assert result.meta.noisy is True
    assert pool.calls[0][0].endswith("Query: q\nNoisy Output:\n") and "five noisy documents" in pool.calls[0][0]


def test_top_k_from_context_and_empty_or_failed_replies_are_failed_searches():
    engine = SimulatedSearch(RecordingPool(), mode="prompt")
    (two,) = _search(engine, ["q"], [SearchContext(top_k=2, seed=0)])
    assert two.documents == ["first document.", "second one."]

    empty = SimulatedSearch(RecordingPool({"text": "  \n", "num_tokens": 2}))
    failed = SimulatedSearch(RecordingPool({"text": NO_INFORMATION, "failed": True, "error": "all servers down"}))
    hung = SimulatedSearch(HangingPool(), timeout_s=0.05)
    for engine, error in [(empty, "no documents"), (failed, "all servers down"), (hung, "did not answer")]:
        (result,) = _search(engine, ["q"], [SearchContext(noise_prob=1.0, seed=0)])
        assert result.meta.failed and result.text == NO_INFORMATION and result.documents == []
        assert error in result.meta.error and result.meta.noisy is True


def test_openai_urls_are_normalized_like_the_original_ip_list():
    assert normalize_openai_url("10.0.0.1") == "http://10.0.0.1:6001/v1"
    assert normalize_openai_url("10.0.0.1:7000") == "http://10.0.0.1:7000/v1"
    assert normalize_openai_url("http://127.0.0.1:8000/v1/") == "http://127.0.0.1:8000/v1"
    assert OpenAISimulator("a,b").urls == ["http://a:6001/v1", "http://b:6001/v1"]
    request = OpenAISimulator(["a"]).request("PROMPT")
    assert request == {
        "model": "",
        "messages": [
            {"role": "system", "content": ""},
            {"role": "user", "content": [{"type": "text", "text": "PROMPT"}]},
        ],
        "max_tokens": 600,
        "temperature": 0.8,
    }


def test_openai_simulator_falls_back_when_no_server_answers():
    engine = OpenAISimulator(["127.0.0.1:9"], timeout_s=2.0, retries=1, backoff_s=0.0)  # port 9: nothing listens
    (result,) = _search(engine, ["q"], [SearchContext(seed=0)])
    assert result.meta.failed and result.text == NO_INFORMATION and result.meta.engine == "openai"
    assert result.meta.error.count("127.0.0.1:9") == 2  # the first attempt and one retry


def test_factory_builds_each_engine(synthetic_world):
    pool = RecordingPool()
    sim = build_search_engine(SearchConfig(engine="simulated", top_k=3), SimulatorConfig(mode="sft"), pool=pool)
    assert isinstance(sim, SimulatedSearch) and sim.mode == "sft" and sim.top_k == 3
    remote = build_search_engine(SearchConfig(engine="openai", openai_urls=["h:1"]), SimulatorConfig(max_tokens=500))
    assert isinstance(remote, OpenAISimulator) and remote.max_tokens == 500 and remote.urls == ["http://h:1/v1"]
    bm25 = build_search_engine(SearchConfig(engine="bm25"), corpus_path=str(synthetic_world["corpus"]))
    assert bm25.name == "bm25"
    http = build_search_engine(SearchConfig(engine="http", url="http://127.0.0.1:1/retrieve"))
    assert http.name == "http"
    with pytest.raises(ValueError, match="corpus_file"):
        build_search_engine(SearchConfig(engine="dense"))
    with pytest.raises(ValueError, match="unknown engine"):
        SearchConfig(engine="google")


def test_shipped_yaml_files_match_the_config_dataclasses():
    import yaml

    from tests.conftest import REPO_ROOT

    simulators = sorted((REPO_ROOT / "conf" / "simulator").glob("*.yaml"))
    searches = sorted((REPO_ROOT / "conf" / "search").glob("*.yaml"))
    assert {p.stem for p in simulators} >= {"smollm2_prompt", "tiny"} and {p.stem for p in searches} >= {"simulated"}
    def with_parents(path):  # a file's `defaults` list names the files it builds on, in the same folder
        values = yaml.safe_load(path.read_text())
        merged = {}
        for parent in values.pop("defaults", []):
            if parent != "_self_":
                merged.update(with_parents(path.with_name(f"{parent}.yaml")))
        return {**merged, **values}

    for path in simulators:
        SimulatorConfig(**with_parents(path))  # an unknown key raises TypeError
    for path in searches:
        SearchConfig(**yaml.safe_load(path.read_text()))


@pytest.mark.slow
def test_simulated_search_over_the_real_pool(ray_local, tiny_llama_path):
    from simulator.pool_actor import create_simulator_pool

    cfg = SimulatorConfig(model=str(tiny_llama_path), num_servers=1, max_tokens=64, max_model_len=1024,
                          request_timeout_s=300.0, health_check_interval_s=0.0, cache_size=16)
    pool = create_simulator_pool(cfg)
    try:
        engine = SimulatedSearch(pool, mode="prompt", timeout_s=600.0)
        ctxs = [SearchContext(question=f"Question {i}?", golden_answers=(f"answer {i}",), noise_prob=0.5, seed=i)
                for i in range(8)]

        async def main():
            first = await asyncio.gather(*(engine.search(f"query {i}", c) for i, c in enumerate(ctxs)))
            repeat = await engine.search("query 0", ctxs[0])  # same seed and query: same draw, so a cache hit
            return first, repeat

        first, repeat = asyncio.run(main())
        assert all(r.meta.num_tokens > 0 and r.meta.noisy is not None for r in first)
        assert [r.meta.noisy for r in first] == [not draw_useful(c, f"query {i}") for i, c in enumerate(ctxs)]
        assert repeat.meta.cache_hit and repeat.text == first[0].text
        stats = ray_local.get(pool.stats.remote(), timeout=60)
        assert stats["calls"] == 9 and stats["cache_hits"] == 1 and stats["failures"] == 0
    finally:
        ray_local.get(pool.shutdown.remote(), timeout=60)
        ray_local.kill(pool)
