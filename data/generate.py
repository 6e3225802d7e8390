"""Seeded generator of the embedded demo data: data/demo/<task id>/ in OPPU's per-user layout, for all seven tasks.

Every user has a consistent personal pattern that a model can only learn from that user's own history (see
data/README.md for each task's pattern); some users change their pattern on SHIFT_DATE. Run
`python -m data.generate` (or `python data/generate.py`) to rebuild data/demo byte for byte; `--lamp DIR` also
writes the same users in the official LaMP file format (questions + outputs) for the converter's tests.
"""

from __future__ import annotations

import argparse
import datetime as dt
import random
import sys
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # `python data/generate.py`: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from oppu.data import Item, Query, User, write_json_atomic, write_oppu
from oppu.tasks import TASKS, CitationTask, Task

SEED = 20240501
SHIFT_DATE = "2021-07-01"
"""Users with a behaviour shift follow their new pattern from this date on (history and all their queries)."""
HISTORY_START, HISTORY_END = dt.date(2019, 1, 1), dt.date(2022, 6, 30)
QUERY_START = dt.date(2022, 7, 1)
# Test users' history sizes: a wide spread (a handful to 300) with a moderate top four, so that the default
# experiment (the four most active users of LaMP_2M) stays practical on CPU.
TEST_SIZES = (300, 120, 72, 48, 40, 34, 30, 26, 22, 20, 18, 16, 14, 12, 11, 10, 9, 8, 8, 7, 6, 6, 5, 4)
OTHER_USERS = 40
OTHER_SIZES = (6, 30)
QUERIES_PER_USER = (4, 8)
SHIFT_EVERY = 3
"""Every third test user (and every third other user) changes pattern on SHIFT_DATE."""

NAMES = ("Ada", "Bruno", "Chiara", "Dmitri", "Elif", "Farid", "Greta", "Hiro", "Ines", "Jonas", "Kemal", "Lena",
         "Mateo", "Nadia", "Omar", "Priya", "Quentin", "Rosa", "Sven", "Tamar", "Umberto", "Vera", "Wen", "Ximena",
         "Yusuf", "Zoe", "Arjun", "Beatriz", "Caleb", "Dalia", "Emil", "Fatima", "Gustav", "Hana", "Igor", "Jade")
CITIES = ("Lisbon", "Denver", "Osaka", "Nairobi", "Glasgow", "Porto Alegre", "Tallinn", "Hanoi", "Seville", "Austin",
          "Krakow", "Perth", "Montreal", "Accra", "Bergen", "Valparaiso")


# -- one task's generator -------------------------------------------------------------------------------------


@dataclass
class Persona:
    """A user's hidden pattern: `old` before SHIFT_DATE, `new` from it on (equal for users without a shift)."""

    old: Any
    new: Any
    shifted: bool


@dataclass
class Spec:
    """How one task draws a persona, a history item and a query for that persona."""

    persona: Callable[[random.Random], Any]
    shift: Callable[[random.Random, Any], Any]
    item: Callable[[random.Random, Any], tuple[dict[str, str], str]]
    """(item fields, the item's family) for a pattern."""
    query: Callable[[random.Random, Any, set[str]], tuple[str, str]]
    """(query text or LaMP input, gold) for a pattern, drawn from families the user's history shows."""
    profile: Callable[[list[dict[str, str]]], str]
    """Textual profile from the user's history fields."""
    families: dict[str, Any] = field(default_factory=dict)


def _pick(rng: random.Random, options: Any) -> Any:
    return options[rng.randrange(len(options))]


# -- LaMP_2M: movie tagging -----------------------------------------------------------------------------------
# Each film family has several plausible tags; each user consistently gives one of them to that family.
FILMS: dict[str, dict[str, tuple[str, ...]]] = {
    "space": {"tags": ("sci-fi", "dystopia", "thought-provoking"),
              "role": ("a starship pilot", "an orbital engineer", "a lone astronaut", "a colony medic"),
              "event": ("loses contact with Earth", "decodes a signal from deep space", "repairs a dying reactor",
                        "finds an alien artifact"),
              "place": ("beyond the asteroid belt", "on a frozen moon", "aboard a generation ship",
                        "at a research station near Jupiter")},
    "crime": {"tags": ("violence", "dark comedy", "action"),
              "role": ("a small-time gangster", "a corrupt detective", "a hitman", "a getaway driver"),
              "event": ("double-crosses the mob boss", "hides a body", "owes money to the cartel",
                        "witnesses a botched robbery"),
              "place": ("in the back alleys of the city", "in a seedy motel", "at a rundown casino",
                        "across the docks at night")},
    "love": {"tags": ("romance", "comedy", "classic"),
             "role": ("a shy florist", "a widowed baker", "a travelling violinist", "a stubborn bookseller"),
             "event": ("falls for a stranger", "rekindles a first love", "writes letters to a secret admirer",
                       "meets a soulmate by chance"),
             "place": ("in a seaside village", "in Paris in the spring", "at a summer wedding",
                       "on a crowded night train")},
    "real": {"tags": ("true story", "based on a book", "classic"),
             "role": ("a wartime nurse", "a civil rights lawyer", "a mountaineer", "a whistleblower"),
             "event": ("risks everything to tell the truth", "survives against all odds",
                       "fights a landmark court case", "leads a historic expedition"),
             "place": ("during the nineteen sixties", "in a mining town", "in occupied Europe",
                       "in a newsroom in the seventies")},
    "mind": {"tags": ("psychology", "twist ending", "thought-provoking"),
             "role": ("an insomniac therapist", "an amnesiac patient", "a grieving mother", "a paranoid writer"),
             "event": ("doubts their own memories", "sees visions of a stranger", "is haunted by a recurring dream",
                       "suspects their reflection"),
             "place": ("in an isolated clinic", "in a house by the lake", "inside a locked ward",
                       "in a silent apartment")},
    "magic": {"tags": ("fantasy", "based on a book", "comedy"),
              "role": ("an apprentice wizard", "a dragon keeper", "a cursed prince", "a forest witch"),
              "event": ("searches for a lost spell", "breaks an ancient curse", "befriends a talking dragon",
                        "steals an enchanted crown"),
              "place": ("in an enchanted kingdom", "beyond the misty mountains", "in a realm of elves",
                        "at a school of sorcery")},
    "society": {"tags": ("social commentary", "dystopia", "thought-provoking"),
                "role": ("a factory worker", "a surveillance officer", "a young activist", "a migrant teacher"),
                "event": ("questions the rules of the regime", "organises a strike", "exposes the ministry",
                          "refuses the mandatory implant"),
                "place": ("in a city of total surveillance", "in a divided nation", "under an authoritarian state",
                          "in a crumbling megacity")},
    "heist": {"tags": ("action", "twist ending", "comedy"),
              "role": ("a retired safecracker", "a master forger", "a clumsy con artist", "an ex-soldier"),
              "event": ("plans one last heist", "assembles a crew of misfits", "robs a billionaire's vault",
                        "steals a priceless diamond"),
              "place": ("in a casino in Monaco", "during a gala in Milan", "inside a high-security bank",
                        "on a speeding train")},
}


def _family_persona(table: dict[str, dict[str, tuple[str, ...]]], key: str) -> Callable[[random.Random], dict]:
    def persona(rng: random.Random) -> dict[str, str]:
        return {family: _pick(rng, spec[key]) for family, spec in table.items()}
    return persona


def _family_shift(table: dict[str, dict[str, tuple[str, ...]]], key: str) -> Callable[[random.Random, dict], dict]:
    def shift(rng: random.Random, old: dict[str, str]) -> dict[str, str]:
        # After the shift every family gets a different plausible label, so old history misleads.
        return {f: _pick(rng, [t for t in table[f][key] if t != old[f]]) for f in old}
    return shift


def _film_text(rng: random.Random, family: str) -> str:
    spec = FILMS[family]
    return (f"{_pick(rng, NAMES)}, {_pick(rng, spec['role'])}, {_pick(rng, spec['event'])} "
            f"{_pick(rng, spec['place'])}.")


def _film_item(rng: random.Random, tags: dict[str, str]) -> tuple[dict[str, str], str]:
    family = _pick(rng, sorted(tags))
    return {"description": _film_text(rng, family), "tag": tags[family]}, family


def _film_query(rng: random.Random, tags: dict[str, str], seen: set[str]) -> tuple[str, str]:
    family = _pick(rng, sorted(seen))
    return TASKS["LaMP_2M"].make_input(_film_text(rng, family)), tags[family]


def _top_profile(field_name: str, what: str) -> Callable[[list[dict[str, str]]], str]:
    def profile(items: list[dict[str, str]]) -> str:
        counts = Counter(item[field_name] for item in items).most_common(3)
        return f"most popular {what}: {counts[0][0]}; also often: {', '.join(c for c, _ in counts[1:]) or 'none'}"
    return profile


# -- LaMP_2N: news categorisation -----------------------------------------------------------------------------
NEWS: dict[str, dict[str, tuple[str, ...]]] = {
    "restaurants": {"cats": ("food & drink", "business", "travel"),
                    "who": ("a family-run noodle bar", "a vegan bakery", "a rooftop restaurant", "a food truck"),
                    "what": ("doubles its prices", "opens a second location", "wins a tasting award",
                             "draws crowds of tourists")},
    "athletes": {"cats": ("sports", "healthy living", "women"),
                 "who": ("a marathon runner", "a retired goalkeeper", "a teenage swimmer", "a basketball coach"),
                 "what": ("shares a recovery routine", "returns after an injury", "breaks a national record",
                          "changes diet before the season")},
    "schools": {"cats": ("education", "parents", "politics"),
                "who": ("a public school district", "a group of teachers", "a school board", "a high school"),
                "what": ("bans phones in class", "cuts homework", "extends the school day",
                         "changes its lunch menu")},
    "fashion": {"cats": ("style & beauty", "entertainment", "business"),
                "who": ("a pop star", "a young designer", "a cosmetics brand", "a fashion house"),
                "what": ("launches a sustainable line", "dresses the award show", "revives a vintage look",
                         "sells out a new collection")},
    "tech": {"cats": ("science & technology", "business", "education"),
             "who": ("a robotics startup", "a chip maker", "a university lab", "a software company"),
             "what": ("unveils a home robot", "raises a new funding round", "trains an AI tutor",
                      "recalls a faulty device")},
    "faith": {"cats": ("religion", "politics", "culture & arts"),
              "who": ("a local church", "an interfaith council", "a cathedral choir", "a mosque"),
              "what": ("hosts a community dinner", "speaks out on a new law", "restores a historic organ",
                       "opens its doors to refugees")},
    "crime": {"cats": ("crime", "politics", "travel"),
              "who": ("a pickpocket ring", "a city councillor", "an airport smuggler", "a fake tour operator"),
              "what": ("is arrested after months", "faces fraud charges", "targets holiday visitors",
                       "is caught on camera")},
    "arts": {"cats": ("culture & arts", "entertainment", "business"),
             "who": ("a small theatre", "a street artist", "a national museum", "an indie film festival"),
             "what": ("announces a surprise show", "loses public funding", "sells a painting at auction",
                      "celebrates its anniversary")},
}


def _news_story(rng: random.Random, family: str) -> tuple[str, str]:
    spec = NEWS[family]
    who, what, city = _pick(rng, spec["who"]), _pick(rng, spec["what"]), _pick(rng, CITIES)
    name = _pick(rng, NAMES)
    text = (f"In {city}, {who} {what}, according to {name}, who followed the story for weeks. "
            f"Residents reacted quickly and the debate continued online.")
    title = f"{who[0].upper()}{who[1:]} in {city} {what}"
    return text, title


def _news_item(rng: random.Random, cats: dict[str, str]) -> tuple[dict[str, str], str]:
    family = _pick(rng, sorted(cats))
    text, title = _news_story(rng, family)
    return {"text": text, "title": title, "category": cats[family]}, family


def _news_query(rng: random.Random, cats: dict[str, str], seen: set[str]) -> tuple[str, str]:
    family = _pick(rng, sorted(seen))
    return TASKS["LaMP_2N"].make_input(_news_story(rng, family)[0]), cats[family]


# -- LaMP_3: product rating -----------------------------------------------------------------------------------
# The review's sentiment sets a base score; each user adds a personal offset (harsh -1, plain 0, generous +1).
SENTIMENT = {
    1: ("It broke on the first day and support never answered.", "A complete waste of money."),
    2: ("It works, but badly, and feels cheap.", "Disappointing for the price."),
    3: ("It does the job, nothing more.", "Average quality, some flaws, some good points."),
    4: ("It works well and arrived on time.", "Solid product, I would buy it again."),
    5: ("Absolutely perfect, exceeded every expectation.", "The best purchase I made this year."),
}
PRODUCTS = ("kettle", "phone case", "desk lamp", "backpack", "blender", "headphones", "yoga mat", "coffee grinder",
            "umbrella", "keyboard", "frying pan", "water bottle", "office chair", "toaster", "bike light")


def _review(rng: random.Random, level: int) -> str:
    return (f"I bought this {_pick(rng, PRODUCTS)} for {_pick(rng, NAMES)}'s birthday in {_pick(rng, CITIES)}. "
            f"{_pick(rng, SENTIMENT[level])}")


def _rating_levels(offset: int) -> tuple[int, ...]:
    # Only sentiment levels whose personal score stays inside 1..5, so the offset is always visible.
    return tuple(level for level in SENTIMENT if 1 <= level + offset <= 5)


def _rating_item(rng: random.Random, offset: int) -> tuple[dict[str, str], str]:
    level = _pick(rng, _rating_levels(offset))
    return {"text": _review(rng, level), "score": str(level + offset)}, str(level)


def _rating_query(rng: random.Random, offset: int, seen: set[str]) -> tuple[str, str]:
    level = int(_pick(rng, sorted(seen)))
    return TASKS["LaMP_3"].make_input(_review(rng, level)), str(level + offset)


def _rating_profile(items: list[dict[str, str]]) -> str:
    scores = Counter(item["score"] for item in items)
    high = max(scores, key=lambda s: (scores[s], s))
    return f"most common score: {high}; scores given: " + ", ".join(f"{s}x{n}" for s, n in sorted(scores.items()))


# -- LaMP_1: citation choice ----------------------------------------------------------------------------------
AREAS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    # area: (topic phrases, method phrases)
    "graphs": (("graph neural networks", "community detection", "link prediction", "knowledge graphs"),
               ("message passing", "spectral clustering", "random walks")),
    "vision": (("object detection", "image segmentation", "video tracking", "depth estimation"),
               ("convolutional backbones", "vision transformers", "feature pyramids")),
    "speech": (("speech recognition", "speaker verification", "text to speech", "keyword spotting"),
               ("acoustic models", "spectrogram augmentation", "connectionist temporal classification")),
    "databases": (("query optimization", "index structures", "transaction processing", "data lakes"),
                  ("cost models", "learned indexes", "columnar storage")),
    "security": (("malware detection", "side channels", "intrusion detection", "secure enclaves"),
                 ("taint analysis", "fuzzing", "formal verification")),
    "biology": (("protein folding", "gene expression", "single-cell sequencing", "drug discovery"),
                ("sequence alignment", "molecular dynamics", "variational autoencoders")),
    "robotics": (("robot grasping", "legged locomotion", "motion planning", "visual navigation"),
                 ("model predictive control", "imitation learning", "sim-to-real transfer")),
    "economics": (("auction design", "labor markets", "price discrimination", "matching markets"),
                  ("mechanism design", "structural estimation", "field experiments")),
}
GENERIC_TITLES = ("A Unified View of Efficient Methods", "Revisiting Common Assumptions",
                  "Scalable and Robust Estimation", "Lessons from a Decade of Practice", "Towards Reliable Evaluation",
                  "Simple Baselines Revisited", "On the Limits of Current Approaches", "Learning with Less Supervision")


def _ref_title(rng: random.Random, area: str) -> str:
    topics, methods = AREAS[area]
    return f"{_pick(rng, methods).capitalize()} for {_pick(rng, topics)}: {_pick(rng, ('a survey', 'new results', 'an empirical study', 'theory and practice', 'a benchmark'))} ({rng.randrange(1995, 2022)})"


def _paper_item(rng: random.Random, areas: tuple[str, ...]) -> tuple[dict[str, str], str]:
    area = _pick(rng, areas)
    topics, methods = AREAS[area]
    topic, method = _pick(rng, topics), _pick(rng, methods)
    title = f"Improving {topic} with {method} in {_pick(rng, CITIES)} data"
    abstract = (f"We study {topic}. We show that {method} improves accuracy on {_pick(rng, topics)} "
                f"benchmarks collected with {_pick(rng, NAMES)}'s group.")
    return {"title": title, "abstract": abstract, "citation": _ref_title(rng, area)}, area


def _paper_query(rng: random.Random, areas: tuple[str, ...], seen: set[str]) -> tuple[str, str]:
    mine = _pick(rng, sorted(seen))
    other = _pick(rng, [a for a in AREAS if a not in areas])
    own, distractor = _ref_title(rng, mine), _ref_title(rng, other)
    task = TASKS["LaMP_1"]
    assert isinstance(task, CitationTask)
    title = f"{_pick(rng, GENERIC_TITLES)} ({_pick(rng, NAMES)} et al.)"
    if rng.random() < 0.5:
        return task.make_choice_input(title, own, distractor), "[1]"
    return task.make_choice_input(title, distractor, own), "[2]"


def _paper_persona(rng: random.Random) -> tuple[str, ...]:
    return tuple(rng.sample(sorted(AREAS), rng.choice((1, 2))))


def _paper_shift(rng: random.Random, old: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(rng.sample([a for a in sorted(AREAS) if a not in old], len(old)))


def _paper_profile(items: list[dict[str, str]]) -> str:
    topics = Counter(t for item in items for ts, _ in AREAS.values() for t in ts if t in item["title"])
    return "research interests: " + ", ".join(t for t, _ in topics.most_common(4))


# -- LaMP_4 / LaMP_5 / LaMP_7: personal writing styles --------------------------------------------------------


@dataclass(frozen=True)
class Style:
    """A personal way of writing a headline, title or tweet around a neutral core."""

    prefix: str
    casing: str
    suffix: str

    def apply(self, core: str) -> str:
        text = {"upper": core.upper(), "lower": core.lower(), "title": core.title(), "plain": core}[self.casing]
        return f"{self.prefix}{text}{self.suffix}"

    def describe(self) -> str:
        return (f"starts with {self.prefix.strip() or 'nothing special'!r}, written in {self.casing} case, "
                f"ends with {self.suffix.strip() or 'no extra mark'!r}")


def _style_persona(prefixes: tuple[str, ...], casings: tuple[str, ...], suffixes: tuple[str, ...],
                   ) -> tuple[Callable, Callable]:
    def persona(rng: random.Random) -> Style:
        return Style(_pick(rng, prefixes), _pick(rng, casings), _pick(rng, suffixes))

    def shift(rng: random.Random, old: Style) -> Style:
        return Style(_pick(rng, [p for p in prefixes if p != old.prefix]),
                     _pick(rng, [c for c in casings if c != old.casing]), old.suffix)
    return persona, shift


def _style_profile(describe: Callable[[list[dict[str, str]]], Counter]) -> Callable[[list[dict[str, str]]], str]:
    def profile(items: list[dict[str, str]]) -> str:
        return describe(items).most_common(1)[0][0]
    return profile


HEADLINE_SUBJECTS = ("city council", "local farmers", "transit workers", "the mayor", "a hospital", "tech workers",
                     "the university", "fishermen", "small landlords", "the regional airline", "nurses",
                     "a water utility")
HEADLINE_ACTIONS = (("approves", "approved"), ("rejects", "rejected"), ("delays", "delayed"),
                    ("protests", "protested"), ("backs", "backed"), ("cancels", "cancelled"))
HEADLINE_OBJECTS = ("a new bike lane plan", "the housing budget", "a four-day week", "the stadium deal",
                    "a plastic bag ban", "late-night bus service", "a tourist tax", "the harbour expansion",
                    "free school meals", "a rent freeze", "the solar farm", "a ban on leaf blowers")


def _headline(rng: random.Random, style: Style) -> tuple[dict[str, str], str]:
    subject, (verb, past), obj = (_pick(rng, HEADLINE_SUBJECTS), _pick(rng, HEADLINE_ACTIONS),
                                  _pick(rng, HEADLINE_OBJECTS))
    city, name = _pick(rng, CITIES), _pick(rng, NAMES)
    text = (f"In {city}, {subject} {past} {obj} on {_pick(rng, ('Monday', 'Tuesday', 'Friday', 'Sunday'))}, "
            f"{name} reported. The decision follows months of debate and affects thousands of residents.")
    core = f"{subject[0].upper()}{subject[1:]} in {city} {verb} {obj}"
    return {"text": text, "title": style.apply(core)}, style.describe()


def _headline_query(rng: random.Random, style: Style, seen: set[str]) -> tuple[str, str]:
    fields, _ = _headline(rng, style)
    return TASKS["LaMP_4"].make_input(fields["text"]), fields["title"]


PROBLEMS = ("long-tail classification", "graph matching", "table question answering", "code summarization",
            "time series forecasting", "medical image triage", "few-shot parsing", "sparse retrieval",
            "speech translation", "document layout analysis")
TECHNIQUES = ("contrastive pretraining", "mixture of experts", "curriculum learning", "low-rank adapters",
              "diffusion priors", "program synthesis", "optimal transport", "knowledge distillation")
ADJECTIVES = ("efficient", "robust", "scalable", "interpretable", "data-efficient", "faithful")
ACRONYM_PARTS = ("FA", "LU", "MI", "RO", "ZE", "TA", "KO", "PI", "NE", "SO", "VA", "DE")
TITLE_FORMS = ("{M}: {A} {P} via {T}", "Towards {A} {P}", "On {T} for {P}", "Can {T} Solve {P}?",
               "{A} {P} with {T}", "{M}: Rethinking {P}")


def _title_persona(rng: random.Random) -> tuple[str, str]:
    return _pick(rng, TITLE_FORMS), _pick(rng, ("title", "plain"))


def _title_shift(rng: random.Random, old: tuple[str, str]) -> tuple[str, str]:
    return _pick(rng, [f for f in TITLE_FORMS if f != old[0]]), old[1]


def _paper_title(rng: random.Random, style: tuple[str, str]) -> tuple[dict[str, str], str]:
    problem, technique, adjective = _pick(rng, PROBLEMS), _pick(rng, TECHNIQUES), _pick(rng, ADJECTIVES)
    method = "".join(rng.sample(ACRONYM_PARTS, 3))
    abstract = (f"We study {problem}, where current systems are slow and brittle. We propose {method}, an "
                f"{adjective} approach built on {technique}. Experiments on {rng.randrange(3, 9)} benchmarks show "
                f"gains of {rng.randrange(2, 15)} points over strong baselines.")
    form, casing = style
    title = form.format(M="{M}", A=adjective.capitalize(), P=problem, T=technique)
    # Title case must not touch the method's acronym, so it is inserted afterwards.
    title = (title.title() if casing == "title" else title).replace("{M}", method)
    return {"title": title, "abstract": abstract}, f"titles follow the pattern '{form}' ({casing} case)"


def _title_query(rng: random.Random, style: tuple[str, str], seen: set[str]) -> tuple[str, str]:
    fields, _ = _paper_title(rng, style)
    return TASKS["LaMP_5"].make_input(fields["abstract"]), fields["title"]


TWEET_SUBJECTS = ("I", "my sister", "our team", "my neighbour", "the whole office", "my best friend")
TWEET_ACTIONS = ("finally tried the new ramen place", "ran five kilometres before breakfast",
                 "fixed the leaking sink", "finished a thousand-piece puzzle", "missed the last train home",
                 "adopted a very loud kitten", "started learning the cello", "baked bread for the first time",
                 "got caught in the rain", "watched the sunrise from the roof")
TWEET_TIMES = ("this morning", "last night", "today", "on Saturday", "after work", "at lunch")


def _tweet_style(rng: random.Random) -> Style:
    return Style(_pick(rng, ("", "ngl ", "omg ", "update: ", "lol ")), _pick(rng, ("lower", "plain", "upper")),
                 _pick(rng, (" 🎉 #blessed", " 😂😂", "!!! #weekendvibes", " ☕ #mondays", "... 🙃", " 🔥🔥 #goals")))


def _tweet_shift(rng: random.Random, old: Style) -> Style:
    new = _tweet_style(rng)
    while new.suffix == old.suffix:
        new = _tweet_style(rng)
    return new


def _neutral_sentence(rng: random.Random) -> str:
    return f"{_pick(rng, TWEET_SUBJECTS)} {_pick(rng, TWEET_ACTIONS)} {_pick(rng, TWEET_TIMES)} with {_pick(rng, NAMES)}"


def _tweet(rng: random.Random, style: Style) -> tuple[dict[str, str], str]:
    return {"text": style.apply(_neutral_sentence(rng))}, style.describe()


def _tweet_query(rng: random.Random, style: Style, seen: set[str]) -> tuple[str, str]:
    sentence = _neutral_sentence(rng)
    return TASKS["LaMP_7"].make_input(sentence[0].upper() + sentence[1:] + "."), style.apply(sentence)


_headline_persona, _headline_shift = _style_persona(
    ("BREAKING: ", "Watch: ", "Opinion | ", "", "Exclusive: ", "Explainer: "), ("title", "lower", "plain", "upper"),
    ("", "!", " (report)", " - here's why", "?"))

SPECS: dict[str, Spec] = {
    "LaMP_1": Spec(_paper_persona, _paper_shift, _paper_item, _paper_query, _paper_profile),
    "LaMP_2N": Spec(_family_persona(NEWS, "cats"), _family_shift(NEWS, "cats"), _news_item, _news_query,
                    _top_profile("category", "category")),
    "LaMP_2M": Spec(_family_persona(FILMS, "tags"), _family_shift(FILMS, "tags"), _film_item, _film_query,
                    _top_profile("tag", "tag")),
    "LaMP_3": Spec(lambda rng: rng.choice((-1, 0, 1)), lambda rng, old: -old if old else rng.choice((-1, 1)),
                   _rating_item, _rating_query, _rating_profile),
    "LaMP_4": Spec(_headline_persona, _headline_shift, _headline, _headline_query, lambda items: ""),
    "LaMP_5": Spec(_title_persona, _title_shift, _paper_title, _title_query, lambda items: ""),
    "LaMP_7": Spec(_tweet_style, _tweet_shift, _tweet, _tweet_query, lambda items: ""),
}


# -- the driver -----------------------------------------------------------------------------------------------


def _dates(rng: random.Random, n: int, start: dt.date, end: dt.date) -> list[str]:
    span = (end - start).days
    return sorted((start + dt.timedelta(days=rng.randrange(span + 1))).isoformat() for _ in range(n))


def _make_user(task: Task, spec: Spec, rng: random.Random, uid: str, size: int, shifted: bool) -> User:
    old = spec.persona(rng)
    persona = Persona(old, spec.shift(rng, old) if shifted else old, shifted)
    history: list[Item] = []
    styles: list[str] = []
    seen_new: set[str] = set()
    for n, date in enumerate(_dates(rng, size, HISTORY_START, HISTORY_END)):
        pattern = persona.new if date >= SHIFT_DATE else persona.old
        fields, family = spec.item(rng, pattern)
        styles.append(family)
        if date >= SHIFT_DATE or not shifted:
            seen_new.add(family)
        history.append(Item(f"{uid}{n:04d}", fields, date))
    if not seen_new:  # a shifted user whose history all predates the shift: queries follow what it shows
        persona = Persona(persona.old, persona.old, False)
        seen_new = set(styles)
    texts = {value for item in history for value in item.fields.values()}
    queries: list[Query] = []
    for n, date in enumerate(_dates(rng, rng.randint(*QUERIES_PER_USER), QUERY_START, QUERY_START +
                                    dt.timedelta(days=150))):
        for _ in range(100):  # redraw until neither the input nor the gold text occurs in the history
            source, gold = spec.query(rng, persona.new, seen_new)
            text = task.query_text(source)
            leaks = text in texts or (task.kind == "generation" and any(gold in t for t in texts))
            if not leaks and all(q.input != source for q in queries):
                break
        else:
            raise RuntimeError(f"{task.id} user {uid}: could not draw a query that does not leak; widen the banks")
        queries.append(Query(f"{uid}9{n:03d}", source, gold, date))
    profile = spec.profile([dict(item.fields) for item in history]) or _most_common(styles)
    return User(uid, tuple(history), tuple(queries), profile)


def _most_common(values: list[str]) -> str:
    return Counter(values).most_common(1)[0][0] if values else ""


def build_task(task_id: str, seed: int = SEED) -> tuple[tuple[User, ...], tuple[User, ...]]:
    """(train users, test users) of one task; the same seed always gives the same users."""
    task, spec = TASKS[task_id], SPECS[task_id]
    rng = random.Random(f"{seed}:{task_id}")
    test = tuple(_make_user(task, spec, rng, str(100 + i), size, shifted=(i % SHIFT_EVERY == 1))
                 for i, size in enumerate(TEST_SIZES))
    train = tuple(_make_user(task, spec, rng, str(200 + i), rng.randint(*OTHER_SIZES), shifted=(i % SHIFT_EVERY == 1))
                  for i in range(OTHER_USERS))
    return train, test


def generate(out_dir: str | Path, tasks: tuple[str, ...] = tuple(TASKS), seed: int = SEED) -> list[Path]:
    """Write every task's demo folder under `out_dir`; returns the folders written."""
    folders = []
    for task_id in tasks:
        train, test = build_task(task_id, seed)
        folders.append(write_oppu(task_id, train, test, out_dir))
    return folders


def write_lamp(task_id: str, out_dir: str | Path, seed: int = SEED, users: int | None = None) -> tuple[Path, Path]:
    """The same users in the official LaMP format: one question per query, each carrying its user's history.

    Writes `out_dir/<task id>_questions.json` and `out_dir/<task id>_outputs.json`; returns both paths.
    """
    train, test = build_task(task_id, seed)
    chosen = (*test, *train)[: users or None]
    questions = [{"id": q.id, "input": q.input, "profile": [item.to_json() for item in u.history]}
                 for u in chosen for q in u.queries]
    golds = [{"id": q.id, "output": q.gold} for u in chosen for q in u.queries]
    out = Path(out_dir)
    paths = out / f"{task_id}_questions.json", out / f"{task_id}_outputs.json"
    write_json_atomic(paths[0], questions)
    write_json_atomic(paths[1], {"task": task_id, "golds": golds})
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Generate the embedded OPPU demo data (seeded, reproducible).")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "demo"),
                        help="folder that receives one sub-folder per task (default: data/demo)")
    parser.add_argument("--task", action="append", choices=list(TASKS), help="only these tasks (repeatable)")
    parser.add_argument("--seed", type=int, default=SEED)
    parser.add_argument("--lamp", metavar="DIR", help="also write the official LaMP format (questions + outputs)")
    args = parser.parse_args(argv)
    tasks = tuple(args.task or TASKS)
    for folder in generate(args.out, tasks, args.seed):
        print(folder)
    for task_id in tasks if args.lamp else ():
        for path in write_lamp(task_id, args.lamp, args.seed):
            print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
