"""The synthetic search world: fictional entities, a passage corpus about them, and questions only the corpus answers.

A model cannot know where an invented person was born, so the policy must search, and learning to search shows up in
the reward. The same world serves every stage in miniature: BM25 over the corpus is a real engine, its results are
simulator-tuning data, and evaluation uses it as the real engine.

Everything is drawn from one seeded ``random.Random``, so the same seed gives byte-identical files.

Entities
    person   birthplace (city), birth year, employer (company), spouse (person), occupation
    company  founder (person), headquarters (city), founding year, industry
    city     country, river, founding year
Questions
    single-hop: one fact about one entity ("In which city was Tavo Merin born?")
    two-hop:    a fact about an entity named through another ("Who founded the company that Tavo Merin works for?")
Splits are drawn per subject entity, so a test question never asks about an entity that a train question asks about.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from actors.protocol import build_prompt_messages

SPLITS = ("train", "val", "test")
SPLIT_SHARES = {"train": 0.8, "val": 0.1, "test": 0.1}
SOURCE_BY_HOPS = {1: "synthetic_1hop", 2: "synthetic_2hop"}

_ONSETS = ["b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "dr", "kr", "th", "st", "vr"]
_VOWELS = ["a", "e", "i", "o", "u", "ae", "ei", "ou"]
_CODAS = ["", "", "n", "r", "l", "s", "th", "x", "m"]
OCCUPATIONS = ["engineer", "painter", "botanist", "historian", "architect", "composer", "cartographer", "chemist",
               "economist", "sculptor", "astronomer", "novelist"]
INDUSTRIES = ["shipbuilding", "textile", "software", "mining", "publishing", "pharmaceutical", "railway", "glassware",
              "aerospace", "agricultural"]
COMPANY_SUFFIXES = ["Works", "Industries", "Labs", "Holdings", "Foundry", "Systems", "Trading", "Collective"]


@dataclass
class Person:
    name: str
    occupation: str
    birth_year: int
    birthplace: str = ""
    employer: str = ""
    spouse: str = ""


@dataclass
class Company:
    name: str
    industry: str
    founded: int
    founder: str = ""
    headquarters: str = ""


@dataclass
class City:
    name: str
    country: str
    river: str
    founded: int


@dataclass
class World:
    people: list[Person] = field(default_factory=list)
    companies: list[Company] = field(default_factory=list)
    cities: list[City] = field(default_factory=list)

    def person(self, name: str) -> Person:
        return self._people_by_name[name]

    def company(self, name: str) -> Company:
        return self._companies_by_name[name]

    def city(self, name: str) -> City:
        return self._cities_by_name[name]

    def index(self) -> None:
        self._people_by_name = {p.name: p for p in self.people}
        self._companies_by_name = {c.name: c for c in self.companies}
        self._cities_by_name = {c.name: c for c in self.cities}


@dataclass(frozen=True)
class Question:
    question: str
    answer: str
    hops: int
    subject: str  # the entity the question is about; splits are drawn per subject


class NameMaker:
    """Pronounceable invented words, never repeated, so every name points at exactly one entity."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.used: set[str] = set()

    def word(self, syllables: int) -> str:
        while True:
            parts = [self.rng.choice(_ONSETS) + self.rng.choice(_VOWELS) + self.rng.choice(_CODAS)
                     for _ in range(syllables)]
            word = "".join(parts).capitalize()
            if word not in self.used and len(word) >= 4:
                self.used.add(word)
                return word

    def person(self) -> str:
        return f"{self.word(2)} {self.word(self.rng.choice((2, 3)))}"

    def company(self) -> str:
        return f"{self.word(2)} {self.rng.choice(COMPANY_SUFFIXES)}"


def build_world(seed: int, entities: int) -> World:
    """``entities`` people, with companies, cities, countries and rivers in proportion."""
    if entities < 16:
        raise ValueError(f"--entities must be at least 16 to give every split questions, got {entities}")
    rng = random.Random(seed)
    names = NameMaker(rng)
    countries = [names.word(3) for _ in range(max(4, entities // 40))]
    rivers = [f"{names.word(2)} River" for _ in range(max(4, entities // 16))]
    world = World()
    world.cities = [City(names.word(rng.choice((2, 3))), rng.choice(countries), rng.choice(rivers),
                         rng.randrange(900, 1800)) for _ in range(max(6, entities // 8))]
    world.people = [Person(names.person(), rng.choice(OCCUPATIONS), rng.randrange(1900, 2000))
                    for _ in range(entities)]
    world.companies = [Company(names.company(), rng.choice(INDUSTRIES), rng.randrange(1850, 2020))
                       for _ in range(max(4, entities // 4))]
    for person in world.people:
        person.birthplace = rng.choice(world.cities).name
        person.employer = rng.choice(world.companies).name
    shuffled = world.people[:]
    rng.shuffle(shuffled)
    for a, b in zip(shuffled[0::2], shuffled[1::2]):
        a.spouse, b.spouse = b.name, a.name
    for company in world.companies:
        company.founder = rng.choice(world.people).name
        company.headquarters = rng.choice(world.cities).name
    world.index()
    return world


def corpus_passages(world: World) -> list[tuple[str, str]]:
    """(title, text) pairs. Facts are spread over several short passages, as in an encyclopedia, so a search has to
    find the right passage, not just the right entity."""
    passages: list[tuple[str, str]] = []
    for p in world.people:
        passages.append((p.name, f"{p.name} is a {p.occupation} who was born in {p.birth_year} in the city of "
                                  f"{p.birthplace}."))
        passages.append((p.name, f"As a {p.occupation}, {p.name} works for {p.employer}, where colleagues know "
                                  f"{p.name.split()[0]} for careful work."))
        if p.spouse:
            passages.append((p.name, f"{p.name} is married to {p.spouse}. The couple met while travelling."))
    for c in world.companies:
        passages.append((c.name, f"{c.name} is a {c.industry} company founded in {c.founded} by {c.founder}."))
        passages.append((c.name, f"{c.name} has its headquarters in {c.headquarters} and employs staff across "
                                  f"the region."))
    for c in world.cities:
        passages.append((c.name, f"{c.name} is a city in {c.country}, founded in {c.founded}."))
        passages.append((c.name, f"The {c.river} flows through {c.name}, which grew up along its banks."))
    return passages


def single_hop_questions(world: World) -> list[Question]:
    qs: list[Question] = []
    for p in world.people:
        qs.append(Question(f"In which city was {p.name} born?", p.birthplace, 1, p.name))
        qs.append(Question(f"In what year was {p.name} born?", str(p.birth_year), 1, p.name))
        qs.append(Question(f"Which company does {p.name} work for?", p.employer, 1, p.name))
        if p.spouse:
            qs.append(Question(f"Who is {p.name} married to?", p.spouse, 1, p.name))
    for c in world.companies:
        qs.append(Question(f"Who founded {c.name}?", c.founder, 1, c.name))
        qs.append(Question(f"In which city is {c.name} headquartered?", c.headquarters, 1, c.name))
        qs.append(Question(f"In what year was {c.name} founded?", str(c.founded), 1, c.name))
    for c in world.cities:
        qs.append(Question(f"In which country is {c.name}?", c.country, 1, c.name))
        qs.append(Question(f"Which river flows through {c.name}?", c.river, 1, c.name))
    return qs


def two_hop_questions(world: World) -> list[Question]:
    qs: list[Question] = []
    for p in world.people:
        birthplace, employer = world.city(p.birthplace), world.company(p.employer)
        qs.append(Question(f"In which country was {p.name} born?", birthplace.country, 2, p.name))
        qs.append(Question(f"Which river flows through the city where {p.name} was born?", birthplace.river, 2,
                           p.name))
        qs.append(Question(f"Who founded the company that {p.name} works for?", employer.founder, 2, p.name))
        qs.append(Question(f"In which city is the company that {p.name} works for headquartered?",
                           employer.headquarters, 2, p.name))
    for c in world.companies:
        founder = world.person(c.founder)
        qs.append(Question(f"In what year was the founder of {c.name} born?", str(founder.birth_year), 2, c.name))
        qs.append(Question(f"In which city was the founder of {c.name} born?", founder.birthplace, 2, c.name))
    return qs


def assign_splits(questions: list[Question], rng: random.Random) -> dict[str, list[Question]]:
    subjects = sorted({q.subject for q in questions})
    rng.shuffle(subjects)
    n_val = max(1, round(len(subjects) * SPLIT_SHARES["val"]))
    n_test = max(1, round(len(subjects) * SPLIT_SHARES["test"]))
    split_of = {s: "test" for s in subjects[:n_test]}
    split_of.update({s: "val" for s in subjects[n_test:n_test + n_val]})
    out: dict[str, list[Question]] = {split: [] for split in SPLITS}
    for q in questions:
        out[split_of.get(q.subject, "train")].append(q)
    for split in SPLITS:
        rng.shuffle(out[split])
    return out


def qa_table(questions: list[Question], split: str) -> pa.Table:
    """One row per question in the ZeroSearch / Search-R1 parquet schema (spec section 8), plus a unique ``uid``."""
    rows = []
    for index, q in enumerate(questions):
        source = SOURCE_BY_HOPS[q.hops]
        uid = f"synthetic/{split}/{index}"
        rows.append({
            "id": uid,
            "data_source": source,
            "question": q.question,
            "golden_answers": [q.answer],
            "prompt": build_prompt_messages(q.question),
            "ability": "fact-reasoning",
            "reward_model": {"style": "rule", "ground_truth": {"target": [q.answer]}},
            "extra_info": {"split": split, "index": index, "uid": uid, "hops": q.hops},
        })
    return pa.Table.from_pylist(rows, schema=QA_SCHEMA)


QA_SCHEMA = pa.schema([
    ("id", pa.string()),
    ("data_source", pa.string()),
    ("question", pa.string()),
    ("golden_answers", pa.list_(pa.string())),
    ("prompt", pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))),
    ("ability", pa.string()),
    ("reward_model", pa.struct([("style", pa.string()),
                                ("ground_truth", pa.struct([("target", pa.list_(pa.string()))]))])),
    ("extra_info", pa.struct([("split", pa.string()), ("index", pa.int64()), ("uid", pa.string()),
                              ("hops", pa.int64())])),
])


def write_world(out_dir: str | Path, seed: int, entities: int) -> dict[str, Path]:
    """Write ``corpus.jsonl`` and ``{train,val,test}.parquet``; return their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    world = build_world(seed, entities)
    rng = random.Random(seed + 1)  # a separate stream so world contents do not shift when split rules change
    paths: dict[str, Path] = {"corpus": out / "corpus.jsonl"}
    with open(paths["corpus"], "w", encoding="utf-8") as f:
        for i, (title, text) in enumerate(corpus_passages(world)):
            f.write(json.dumps({"id": str(i), "contents": f"{title}\n{text}"}, ensure_ascii=False) + "\n")
    splits = assign_splits(single_hop_questions(world) + two_hop_questions(world), rng)
    for split, questions in splits.items():
        paths[split] = out / f"{split}.parquet"
        pq.write_table(qa_table(questions, split), paths[split])
    return paths
