"""The cold start: scripted protocol demonstrations over real BM25, and SFT on them with a real DeepSpeed learner."""

from __future__ import annotations

import asyncio
import json

import pytest

from actors.episode import EpisodeConfig
from actors.expert import expert_query, information_text, write_demonstration
from actors.protocol import OBSERVATION_HEAD, OBSERVATION_TAIL, cut_at_action, parse_action, prompt_token_ids
from actors.reward import substring_match
from tests.test_train_e2e import _spans


@pytest.fixture(scope="module")
def bm25(synthetic_world, tmp_path_factory):
    from simulator.engines import BM25Search

    return BM25Search(synthetic_world["corpus"], index_dir=tmp_path_factory.mktemp("bm25"), top_k=3)


@pytest.fixture(scope="module")
def single_hop(synthetic_world):
    from actors.dataset import load_qa

    return [x for x in load_qa(synthetic_world["train"]) if x.data_source == "synthetic_1hop"]


def _demo(example, bm25, tokenizer, **episode):
    cfg = EpisodeConfig(max_obs_tokens=episode.pop("max_obs_tokens", 400), **episode)
    return asyncio.run(write_demonstration(example.question, example.golden_answers, bm25, tokenizer, cfg, seed=1))


def test_expert_query_is_the_question_on_one_line():
    assert expert_query("  Who founded\n Voxbeim   Pousou? ") == "Who founded Voxbeim Pousou"


def test_demonstration_has_the_protocol_shape(single_hop, bm25, tokenizer):
    example = single_hop[0]
    demo = _demo(example, bm25, tokenizer)
    gold = example.golden_answers[0]

    # Three spans: the expert's search turn (1), the real <information> block (0), the expert's answer turn (1).
    spans = _spans(demo.loss_mask)
    assert [v for _, _, v in spans] == [1, 0, 1]
    first, observation, second = (tokenizer.decode(demo.response_ids[a:b]) for a, b, _ in spans)
    action = parse_action(cut_at_action(first))
    assert first.startswith("<think>") and action.kind == "search" and action.content == expert_query(example.question)
    assert observation.startswith(OBSERVATION_HEAD) and observation.endswith(OBSERVATION_TAIL)
    assert second.startswith("<think>") and second.endswith(f"<answer> {gold} </answer>")
    assert parse_action(second).content == gold

    # Single-hop questions of the synthetic world are answerable from one BM25 search: the demo is grounded.
    assert demo.grounded and gold in information_text(demo.response_text)
    assert demo.reward == 1.0
    assert demo.prompt_ids == prompt_token_ids(example.question, tokenizer)  # the rollout's own prompt


def test_ungrounded_demonstration_is_flagged(single_hop, bm25, tokenizer):
    example = single_hop[0]
    # An observation too short to hold any document text: the gold answer cannot have been read.
    demo = _demo(example, bm25, tokenizer, max_obs_tokens=12)
    assert not demo.grounded
    assert demo.reward == 1.0  # the expert still answers with the gold; such demos are dropped, not trained on


def test_demonstrations_vary_their_thoughts_but_always_search_the_question(single_hop, bm25, tokenizer):
    from actors.expert import ANSWER_THOUGHTS, SEARCH_THOUGHTS

    example = single_hop[0]
    cfg = EpisodeConfig(max_obs_tokens=400)
    demos = [asyncio.run(write_demonstration(example.question, example.golden_answers, bm25, tokenizer, cfg, seed=k))
             for k in range(len(SEARCH_THOUGHTS) * len(ANSWER_THOUGHTS))]
    texts = [d.response_text for d in demos]
    assert len(set(texts)) == len(texts)  # every pair of phrasings once
    for text in texts:
        first = cut_at_action(text)
        assert parse_action(first).content == expert_query(example.question)
        assert text.count("<search>") == 1 and text.endswith(f"<answer> {example.golden_answers[0]} </answer>")


def test_the_name_query_is_the_longest_capitalized_name_after_the_question_word():
    from actors.expert import entity_query

    assert entity_query("Who founded the company that Tavo Merin works for?") == "Tavo Merin"
    assert entity_query("Which river flows through the city where Soslas Feilstirbou was born?") == "Soslas Feilstirbou"
    assert entity_query("Who was the founder of Brilgis Collective Works?") == "Brilgis Collective Works"
    assert entity_query("In which year was it founded?") is None


def test_a_search_by_name_is_still_one_search_about_the_question_and_is_grounded(single_hop, bm25, tokenizer):
    from actors.expert import entity_query

    cfg = EpisodeConfig(max_obs_tokens=400)
    demos = [asyncio.run(write_demonstration(x.question, x.golden_answers, bm25, tokenizer, cfg, seed=1,
                                             query_style="name")) for x in single_hop[:20]]
    for x, d in zip(single_hop, demos):
        assert parse_action(cut_at_action(d.response_text)).content == entity_query(x.question)
        assert d.response_text.count("<search>") == 1
    assert sum(d.grounded for d in demos) >= 16  # BM25 on the name alone finds the fact as well


def test_the_keyword_query_is_the_name_then_the_other_words_that_carry_meaning():
    from actors.expert import keyword_query

    assert keyword_query("In which city was Tavo Merin born?") == "Tavo Merin city born"
    assert keyword_query("Which river flows through the city where Soslas Feilstirbou was born?") == \
        "Soslas Feilstirbou river flows through city born"
    assert keyword_query("Who founded Brilgis Collective?") == "Brilgis Collective founded"
    assert keyword_query("In which year was it founded?") == "year it founded"
    assert keyword_query("Who is it?") == "it"


def test_a_keyword_search_ranks_the_fact_asked_for_first_more_often_than_the_question(single_hop, bm25):
    from actors.expert import expert_query, keyword_query

    def first_holds_answer(query_of):
        docs = bm25.retrieve([query_of(x.question) for x in single_hop[:60]])
        return sum(substring_match(d[0].contents, x.golden_answers) for d, x in zip(docs, single_hop))

    assert first_holds_answer(keyword_query) > first_holds_answer(expert_query)


def test_query_styles_follow_their_shares_and_reject_shares_over_one():
    from launch.driver.warmup import query_styles

    styles = query_styles(1000, 0.2, 0.5, seed=3)
    assert abs(styles.count("name") - 200) < 50 and abs(styles.count("keywords") - 500) < 50
    assert query_styles(10, 0.0, 0.0, seed=3) == ["question"] * 10
    assert query_styles(10, 0.0, 1.0, seed=3) == ["keywords"] * 10
    with pytest.raises(ValueError, match="keyword_query_share"):
        query_styles(10, 0.6, 0.5, seed=3)


def test_the_evidence_is_the_first_retrieved_sentence_that_holds_the_answer():
    from actors.expert import evidence_sentence

    information = ("Doc 1: Tavo Merin Tavo Merin is a painter. He was born in 1950 in the city of Thilgourdun.\n"
                   "Doc 2: Thilgourdun The Vunthax River flows through Thilgourdun, which grew up along its banks.")
    assert evidence_sentence(information, ("Thilgourdun",)) == "He was born in 1950 in the city of Thilgourdun."
    assert evidence_sentence(information, ("vunthax river",)) == ("Thilgourdun The Vunthax River flows through "
                                                                  "Thilgourdun, which grew up along its banks.")
    assert evidence_sentence(information, ("Dravik Group",)) is None
    assert len(evidence_sentence("Doc 1: " + "word " * 60 + "Paris.", ("Paris",)).split()) == 40


def test_a_demonstration_that_cites_evidence_quotes_what_it_read_before_answering(single_hop, bm25, tokenizer):
    from actors.expert import EVIDENCE_THOUGHTS, evidence_sentence

    cfg = EpisodeConfig(max_obs_tokens=400)
    for x in single_hop[:8]:
        demo = asyncio.run(write_demonstration(x.question, x.golden_answers, bm25, tokenizer, cfg, seed=1,
                                               cite_evidence=True))
        evidence = evidence_sentence(information_text(demo.response_text), x.golden_answers)
        last_turn = demo.response_text.split(OBSERVATION_TAIL.strip())[-1]
        assert demo.grounded and evidence and x.golden_answers[0] in evidence
        assert EVIDENCE_THOUGHTS[0].format(evidence=evidence) in last_turn  # seed 1 picks the first phrasing
        assert demo.response_text.count("<search>") == 1
        assert last_turn.strip().endswith(f"<answer> {x.golden_answers[0]} </answer>")


def test_a_quote_that_cites_its_query_names_what_was_searched(single_hop, bm25, tokenizer):
    from actors.expert import QUERY_EVIDENCE_THOUGHTS, entity_query, evidence_sentence

    cfg = EpisodeConfig(max_obs_tokens=400)
    for x in single_hop[:4]:
        demo = asyncio.run(write_demonstration(x.question, x.golden_answers, bm25, tokenizer, cfg, seed=1,
                                               query_style="name", cite_evidence=True, cite_query=True))
        evidence = evidence_sentence(information_text(demo.response_text), x.golden_answers)
        name = entity_query(x.question)
        last_turn = demo.response_text.split(OBSERVATION_TAIL.strip())[-1]
        assert f"<search> {name} </search>" in demo.response_text
        assert QUERY_EVIDENCE_THOUGHTS[0].format(query=name, evidence=evidence) in last_turn
        assert demo.response_text.count("<search>") == 1


def test_most_single_hop_demonstrations_are_grounded(single_hop, bm25, tokenizer):
    demos = [_demo(x, bm25, tokenizer) for x in single_hop[:40]]
    assert sum(d.grounded for d in demos) >= 36  # measured: 40 of 40 with top 3 on this world


def test_the_decision_token_is_the_one_that_writes_answer_after_the_observation(single_hop, bm25, tokenizer):
    from actors.expert import decision_token_index

    demo = _demo(single_hop[0], bm25, tokenizer)
    k = decision_token_index(demo.response_ids, demo.loss_mask, tokenizer)
    last_observation = max(i for i, m in enumerate(demo.loss_mask) if m == 0)
    assert k > last_observation and demo.loss_mask[k] == 1
    before = tokenizer.decode(demo.response_ids[last_observation + 1:k])
    assert before.endswith("</think>\n<") and tokenizer.decode(demo.response_ids[k:]).startswith("answer>")
    # The first turn's "<search>" opens before any observation: it is never the decision token.
    assert decision_token_index(demo.response_ids[:last_observation + 1], demo.loss_mask[:last_observation + 1],
                                tokenizer) is None


@pytest.mark.parametrize("share, siblings", [(0.0, 0), (0.25, 4), (0.5, 12)])
def test_search_again_siblings_train_only_the_choice_to_search(single_hop, bm25, tokenizer, share, siblings):
    from launch.driver.warmup import demonstration_samples

    demos = [_demo(x, bm25, tokenizer) for x in single_hop[:12]]
    samples = demonstration_samples(demos, tokenizer, search_again_share=share)
    assert len(samples) == 12 + siblings  # share / (1 - share) of the demonstrations: 0, 4, 12
    assert [s.loss_mask for s in samples[:12]] == [d.loss_mask for d in demos]  # the demonstrations as they were
    for s in samples[12:]:
        trained = [t for t, m in zip(s.input_ids[s.prompt_len:], s.loss_mask) if m]
        assert len(trained) == 1 and s.loss_mask[-1] == 1  # one token: the last
        text = tokenizer.decode(s.input_ids[s.prompt_len:])
        assert text.endswith("</think>\n<search") and text.count("<information>") == 1  # no query is shown
        demo = next(d for d in demos if d.prompt_ids + d.response_ids[:len(s.input_ids) - len(d.prompt_ids) - 1]
                    == s.input_ids[:-1])  # the same episode up to the choice
        assert demo.response_text.endswith("</answer>")
    with pytest.raises(ValueError, match="search_again_share=1.0"):
        demonstration_samples(demos, tokenizer, search_again_share=1.0)


def _warmup_config(tmp_path, **warmup):
    from launch.config import Config, WarmupConfig
    from learners.config import LearnerConfig

    cfg = Config()
    cfg.warmup = WarmupConfig(demonstrations=12, steps=8, batch_size=6, lr=1e-2, lr_warmup_steps=0,
                              micro_batch_tokens=2048, **warmup)
    cfg.search.top_k = 3  # the demonstrations' documents per search are the run's
    cfg.learner = LearnerConfig(zero_stage=0)
    cfg.rollout.episode.max_obs_tokens = 128
    return cfg


@pytest.mark.slow
def test_warm_up_lowers_the_sft_loss_and_exports_a_loadable_policy(ray_local, tiny_llama_path, synthetic_world,
                                                                    tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    from launch.driver.warmup import warm_up

    monkeypatch.setenv("ZEROSEARCH_RAY_MODELS", str(tmp_path / "models"))  # the cache of warmed policies
    cfg = _warmup_config(tmp_path)
    cfg.train.warmup = "auto"  # tiny-llama is far below warmup.max_params
    path, summary = warm_up(cfg, str(tiny_llama_path), synthetic_world["train"], synthetic_world["corpus"], tmp_path)

    assert path.startswith(str(tmp_path / "models" / "warmed"))
    assert summary["demonstrations"] == 12 and not summary["cached"]
    losses = summary["sft_losses"]
    assert len(losses) == 8 and all(v == v for v in losses)
    assert losses[-1] < 0.7 * losses[0], losses
    assert "<answer>" in summary["example"] and "<information>" in summary["example"]
    assert AutoModelForCausalLM.from_pretrained(path).config.num_hidden_layers == 2
    assert json.loads((tmp_path / "models" / "warmed").glob("*/warmup.json").__next__().read_text())["steps"] == 8

    # Same model, data and settings: the cached policy is reused; a changed setting builds a new one.
    again, cached = warm_up(cfg, str(tiny_llama_path), synthetic_world["train"], synthetic_world["corpus"], tmp_path)
    assert again == path and cached["cached"]
    off = _warmup_config(tmp_path)
    off.train.warmup = "off"
    assert warm_up(off, str(tiny_llama_path), synthetic_world["train"], synthetic_world["corpus"], tmp_path) == (
        str(tiny_llama_path), {})


def test_the_cache_key_follows_the_data_content_not_where_or_when_it_was_written(tiny_llama_path, synthetic_world,
                                                                                 tmp_path, monkeypatch):
    import shutil
    import time

    from launch.driver import warmup

    cfg = _warmup_config(tmp_path)
    files = [synthetic_world["train"], synthetic_world["corpus"]]
    key = warmup.cache_key(cfg, str(tiny_llama_path), files)
    time.sleep(0.01)  # a later write: another modification time
    copies = [shutil.copy(f, tmp_path / f.name) for f in files]  # the same world, written again elsewhere
    assert warmup.cache_key(cfg, str(tiny_llama_path), copies) == key
    with open(copies[1], "a") as f:  # one more document: another world
        f.write('{"id": "extra", "contents": "x"}\n')
    assert warmup.cache_key(cfg, str(tiny_llama_path), copies) != key
    # Past the size limit a file is keyed by size and time, without reading it: a rewrite then builds anew.
    monkeypatch.setattr(warmup, "CONTENT_KEY_MAX_BYTES", 0)
    large = warmup.cache_key(cfg, str(tiny_llama_path), copies)
    shutil.copy(files[1], copies[1])
    assert warmup.cache_key(cfg, str(tiny_llama_path), copies) != large


def test_warmup_mode_is_checked(tiny_llama_path):
    from launch.driver.warmup import should_warm_up

    assert should_warm_up("auto", str(tiny_llama_path), 1e9)
    assert not should_warm_up("auto", str(tiny_llama_path), 1e3)  # tiny-llama has ~3.2M parameters
    assert should_warm_up("on", str(tiny_llama_path), 1e3)
    with pytest.raises(ValueError, match="train.warmup='sometimes'"):
        should_warm_up("sometimes", str(tiny_llama_path), 1e9)


def test_a_turn_budget_too_small_for_the_expert_is_named(synthetic_world, tiny_llama_path, tmp_path):
    from launch.driver.warmup import write_demonstrations

    cfg = _warmup_config(tmp_path)
    cfg.rollout.episode.max_tokens_per_turn = 12
    with pytest.raises(RuntimeError, match="max_tokens_per_turn=12"):
        write_demonstrations(cfg, str(tiny_llama_path), synthetic_world["train"], synthetic_world["corpus"])
