"""Registry of the seven LaMP tasks: labels, prompt wording, query extraction, history examples, normalisation.

Facts taken from the official code (read, not copied):
- `LaMP-Benchmark/LaMP` defines each task's `input` wording (e.g. LaMP_2M `... tags: [...] description: TEXT`) and
  the evaluation's label lists (kept here in the same order, which macro-F1 depends on).
- `TamSiuhin/OPPU` (`prompt/prompt.json`, `utils.py`) extracts the query text after a per-task marker, writes
  history items as `description: ... tag: ...` and turns every history item into a training example by asking the
  task's own question about the item with the item's label as the target. Its BM25 query is the task's
  `retrieval_query` template: a short instruction, then the query's text (at training time the history item's own
  source text; for LaMP_1 the paper title). `retrieval_template` keeps those templates word for word. For LaMP_1 it trains on
  `paper title: {title} reference:` -> `{citation}`, which needs a `citation` field that raw LaMP items lack; see
  `CitationTask.history_example` for what we do without it.

Each task is data (templates, markers) plus the few methods of `Task`; LaMP_1 alone overrides three of them
because its input is a two-option question. Nothing here imports heavy libraries.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from oppu.errors import OppuError

Kind = Literal["classification", "rating", "generation"]

# How a history item is cut before it goes into a prompt: OPPU keeps the first 768 whitespace tokens of a
# training item and 368 of a retrieved one; one limit keeps prompts bounded and consistent everywhere.
MAX_ITEM_WORDS = 368
MAX_QUERY_WORDS = 768


class UnknownTaskError(OppuError, KeyError):
    """A task id that is not one of the seven LaMP tasks; the message lists the valid ids."""

    def __str__(self) -> str:  # KeyError would otherwise print the message with quotes around it
        return str(self.args[0]) if self.args else "unknown task"


def first_words(text: str, n: int) -> str:
    """The first `n` whitespace-separated words of `text` (the truncation the OPPU code applies to items)."""
    words = text.split()
    return text.strip() if len(words) <= n else " ".join(words[:n])


def _fields(item: Any) -> Mapping[str, str]:
    """Field mapping of an `oppu.data.Item` or of a plain dict item."""
    fields = getattr(item, "fields", item)
    if not isinstance(fields, Mapping):
        raise TypeError(f"expected an Item or a mapping of fields, got {type(item).__name__}")
    return fields


@dataclass(frozen=True)
class Task:
    """One LaMP task. Prompts are plain user-message strings; chat templating happens in generate/train."""

    id: str
    name: str
    """OPPU's folder name (movie_tagging, ...)."""
    kind: Kind
    labels: tuple[str, ...]
    """Label set in the official evaluation's order; empty for generation."""
    profile_fields: tuple[str, ...]
    """Fields every history item must carry (besides `id` and an optional `date`)."""
    max_new_tokens: int
    source_field: str
    """The item field that plays the role of a query's text (description, text, abstract...)."""
    target_field: str
    """The item field that plays the role of a query's answer (tag, category, score, title...)."""
    item_format: tuple[tuple[str, str], ...]
    """(prompt label, field) pairs that render a history item, the target last."""
    input_template: str
    """The official LaMP `input` wording with `{text}` where the query text goes."""
    markers: tuple[str, ...]
    """Markers after which the query text starts in a LaMP `input` (first found wins)."""
    question: str
    """The main instruction of our prompt, with `{text}`; it states the answer format explicitly."""
    answer_label: str
    """The word the prompt ends on (`tag:`, `headline:`); a generation that repeats it gets it removed."""
    profile_instruction: str
    """PAG: what the summarising model is asked to write about the user (from OPPU's prompt_profile.json)."""
    aliases: Mapping[str, str] = field(default_factory=dict)
    """Extra spellings that mean a label (LaMP_1: `1` -> `[1]`)."""
    history_from_source: bool = True
    """False when the history item is the answer itself (LaMP_7 tweets): OPPU then trains the adapter to write
    the user's tweet from an empty text, i.e. plain language modelling of the user's own tweets."""
    retrieval_template: str = "{text}"
    """OPPU's BM25 query (`prompt.json` `retrieval_query_wokey`, word for word, typos included) with `{text}`
    where the query's text goes."""

    @property
    def label_field(self) -> str | None:
        """The field `text_only` history drops: the answer, unless the answer is the item's only text (LaMP_7)."""
        return None if self.target_field == self.source_field else self.target_field

    @property
    def history_answers_queries(self) -> bool:
        """Whether a history item's training example asks what a query asks (same question, an answer a query
        could have), so held-out items can stand in for queries (`oppu.splits`). Not for LaMP_7, whose items
        have no source text, nor LaMP_1 (see CitationTask)."""
        return self.history_from_source

    # -- retrieval side --------------------------------------------------------------------------------------
    def retrieval_query(self, input: str, instruction: bool = True) -> str:
        """What a retriever matches a query's `input` against: OPPU's instruction + the query text for BM25
        (`instruction=True`), the query text alone otherwise (LaMP's dense retriever matches the text only)."""
        return self._query(self._retrieval_text(input), instruction)

    def history_query(self, item: Any, instruction: bool = True) -> str:
        """The retrieval query of a history item's training example: OPPU's `retrieval_query.format(**item)`,
        i.e. the instruction + the item's own source text (LaMP_7: its tweet, LaMP_1: its title), cut as OPPU
        cuts training items. Never the example's input: a LaMP_7 example's input has no text at all."""
        text = first_words(str(_fields(item).get(self.source_field, "")), MAX_QUERY_WORDS)
        return self._query(text, instruction)

    def _retrieval_text(self, input: str) -> str:
        return self.query_text(input)

    def _query(self, text: str, instruction: bool) -> str:
        return self.retrieval_template.format(text=text) if instruction else text

    # -- query side ------------------------------------------------------------------------------------------
    def query_text(self, input: str) -> str:
        """The part of a LaMP `input` that retrievers match on (the article, description, review...)."""
        for marker in self.markers:
            at = input.find(marker)
            if at != -1:
                return input[at + len(marker):].strip()
        # Dirty inputs (e.g. LaMP_2M dev question "110") lack the marker: the whole input is the best text.
        return input.strip()

    def make_input(self, text: str) -> str:
        """A LaMP-format `input` asking this task's question about `text` (used for history examples)."""
        return self.input_template.format(text=text)

    # -- prompts ---------------------------------------------------------------------------------------------
    def format_item(self, item: Any, text_only: bool = False) -> str:
        """One history item as it appears in a prompt (and, in full, OPPU's `retrieval_history` BM25 document);
        `text_only` drops `label_field` (nothing for LaMP_7, whose tweet is both its text and its answer)."""
        fields = _fields(item)
        parts = []
        for label, name in self.item_format:
            if text_only and name == self.label_field:
                continue
            value = fields.get(name)
            if value:
                parts.append(f"{label}: {first_words(str(value), MAX_ITEM_WORDS)}")
        return " ".join(parts)

    def main_question(self, input: str) -> str:
        """The task question about one input, ending on the answer label."""
        text = first_words(self.query_text(input), MAX_QUERY_WORDS)
        return self.question.format(text=text, labels=", ".join(self.labels))

    def prompt(self, input: str, retrieved: Iterable[Any] = (), profile: str | None = None,
               text_only: bool = False) -> str:
        """User message for one input: optional profile, optional retrieved history items, then the question."""
        blocks = []
        if profile and profile.strip():
            blocks.append(f"User profile: {profile.strip()}")
        items = [self.format_item(item, text_only) for item in retrieved]
        items = [line for line in items if line]
        if items:
            blocks.append("Past items of this user:\n" + "\n".join(f"- {line}" for line in items))
        blocks.append(self.main_question(input))
        return "\n\n".join(blocks)

    # -- training side ---------------------------------------------------------------------------------------
    def history_example(self, item: Any) -> tuple[str, str] | None:
        """A history item as an OPPU training example: (LaMP-format input, target), or None when unusable.

        The input has the same shape as `Query.input`, so callers build the prompt with `prompt()` (with
        retrieved items and a profile when the method uses them) exactly as for a real query.
        """
        fields = _fields(item)
        target = str(fields.get(self.target_field, "")).strip()
        text = str(fields.get(self.source_field, "")).strip() if self.history_from_source else ""
        if not target or (self.history_from_source and not text):
            return None
        return self.make_input(first_words(text, MAX_QUERY_WORDS)), target

    def profile_prompt(self, items: Iterable[Any]) -> str:
        """PAG: the prompt asking a model to summarise this user from some of their history items."""
        lines = [self.format_item(item) for item in items]
        history = "\n".join(f"- {line}" for line in lines if line) or "- (no history)"
        return f"{self.profile_instruction}\n\nUser history:\n{history}\n\nAnswer:"

    # -- output side -----------------------------------------------------------------------------------------
    def normalize(self, raw: str) -> str:
        """Raw generation -> the string the LaMP metric reads (a label when one is recognisable)."""
        text = _first_line(raw)
        text = _drop_prefix(text, self.answer_label)
        return _NORMALIZERS[self.kind](self, text)


def _first_line(raw: str) -> str:
    for line in str(raw).strip().splitlines():
        if line.strip():
            return line.strip()
    return ""


def _drop_prefix(text: str, label: str) -> str:
    # Models often echo the answer label the prompt ended on ("tag: comedy").
    if text.lower().startswith(label.lower()):
        return text[len(label):].strip()
    return text


def _normalize_label(task: Task, text: str) -> str:
    cleaned = text.strip().strip("\"'`*").rstrip(".").strip().lower()
    lowered = {label.lower(): label for label in task.labels}
    lowered.update({alias.lower(): label for alias, label in task.aliases.items()})
    if cleaned in lowered:
        return lowered[cleaned]
    # Otherwise exactly one label must be mentioned ("comedy, because..."); a hedge naming two gets no credit.
    mentioned = {lowered[key] for key in lowered if re.search(rf"(?<!\w){re.escape(key)}(?!\w)", cleaned)}
    # "dark comedy" also mentions "comedy": drop labels contained in another mentioned label.
    mentioned = {m for m in mentioned if not any(m != o and m.lower() in o.lower() for o in mentioned)}
    if len(mentioned) == 1:
        return mentioned.pop()
    return text.strip()


def _normalize_rating(task: Task, text: str) -> str:
    stripped = text.strip()
    try:
        float(stripped)
        return stripped
    except ValueError:
        pass
    match = re.search(r"(?<![\d.])([1-5])(?![\d.])", stripped)
    return match.group(1) if match else stripped


def _normalize_generation(task: Task, text: str) -> str:
    return text.strip().strip('"').strip()


_NORMALIZERS = {"classification": _normalize_label, "rating": _normalize_rating, "generation": _normalize_generation}


@dataclass(frozen=True)
class CitationTask(Task):
    """LaMP_1: the input names the author's paper and two candidate references, answered `[1]` or `[2]`."""

    _PATTERN = re.compile(r'title\s+"(?P<title>.*?)".*?\[1\]:?\s*"(?P<one>.*?)".*?\[2\]:?\s*"(?P<two>.*?)"',
                          re.DOTALL)

    def parse(self, input: str) -> tuple[str, str, str] | None:
        """(paper title, reference [1], reference [2]) of a LaMP_1 input, or None when it does not parse."""
        match = self._PATTERN.search(input)
        return (match["title"], match["one"], match["two"]) if match else None

    def make_choice_input(self, title: str, one: str, two: str) -> str:
        """The official LaMP_1 input wording for a paper and its two candidate references."""
        return (f'For an author who has written the paper with the title "{title}", which reference is '
                f'related? Just answer with [1] or [2] without explanation. [1]: "{one}" [2]: "{two}"')

    def query_text(self, input: str) -> str:
        # The text that identifies the question: the two candidate references (LaMP's own retriever matches them).
        parsed = self.parse(input)
        return f"{parsed[1]} {parsed[2]}" if parsed else input.strip()

    def _retrieval_text(self, input: str) -> str:
        # OPPU retrieves with the author's paper title (`extract_citation_title`), not with the references.
        parsed = self.parse(input)
        if parsed:
            return parsed[0]
        if input.startswith("paper title:"):  # a history example's input
            return input[len("paper title:"):].removesuffix("reference:").strip()
        return input.strip()

    def main_question(self, input: str) -> str:
        parsed = self.parse(input)
        if parsed:
            title, one, two = parsed
            return (f'An author wrote the paper titled "{title}". Which of these two references is this author '
                    f'more likely to cite?\n[1]: "{one}"\n[2]: "{two}"\nAnswer with only [1] or [2].\nreference:')
        if input.startswith("paper title:"):
            # An OPPU history example: name the reference the author cited in this paper.
            return ("Name a reference this author cited in the paper below. Answer with only the reference "
                    f"title.\n{input.strip()}")
        if input.startswith("abstract:"):
            return f"Write the title of this author's paper. Answer with only the title.\n{input.strip()}"
        return f"{input.strip()}\nAnswer with only [1] or [2].\nreference:"

    @property
    def history_answers_queries(self) -> bool:
        # An item's example asks for the paper's citation (or title), not the [1]/[2] choice a query asks.
        return False

    def history_example(self, item: Any) -> tuple[str, str] | None:
        """OPPU's LaMP_1 example `paper title: T reference:` -> cited reference, when the item has `citation`.

        Raw LaMP_1 profile items carry only title and abstract; then the example asks for the paper's title
        from its abstract, which still teaches the adapter the author's topics (documented in data/README.md).
        """
        fields = _fields(item)
        title, citation, abstract = (str(fields.get(k, "")).strip() for k in ("title", "citation", "abstract"))
        if title and citation:
            return f"paper title: {title} reference:", citation
        if title and abstract:
            return f"abstract: {first_words(abstract, MAX_QUERY_WORDS)} title:", title
        return None


_LAMP2N_LABELS = ("food & drink", "sports", "education", "parents", "religion", "travel", "business", "crime",
                  "science & technology", "culture & arts", "entertainment", "politics", "women", "style & beauty",
                  "healthy living")
_LAMP2M_LABELS = ("sci-fi", "based on a book", "comedy", "action", "twist ending", "dystopia", "dark comedy",
                  "classic", "psychology", "fantasy", "romance", "thought-provoking", "social commentary",
                  "violence", "true story")


def _registry() -> dict[str, Task]:
    tasks = [
        CitationTask(
            id="LaMP_1", name="citation", kind="classification", labels=("[1]", "[2]"),
            profile_fields=("title", "abstract"), max_new_tokens=4,
            source_field="title", target_field="citation",
            item_format=(("paper title", "title"), ("reference", "citation")),
            input_template='For an author who has written the paper with the title "{text}", which reference is '
                           "related? Just answer with [1] or [2] without explanation.",
            markers=(), question="{text}", answer_label="reference:",
            retrieval_template="Identify the most relevant reference for the listed publication by the researcher. Select the "
                               "reference paper that is most closely related to the researcher's work. Please respond "
                               "with only the number that corresponds to the reference.\npaper title: {text}",
            profile_instruction="Write a short summary, in English, of the research interests and topics of the "
                                "researcher who published the following papers. Only write the summary.",
            aliases={"1": "[1]", "2": "[2]", "(1)": "[1]", "(2)": "[2]"},
        ),
        Task(
            id="LaMP_2N", name="news_categorize", kind="classification", labels=_LAMP2N_LABELS,
            profile_fields=("text", "title", "category"), max_new_tokens=8,
            source_field="text", target_field="category",
            item_format=(("article", "text"), ("category", "category")),
            input_template="Which category does this article relate to among the following categories? Just "
                           "answer with the category name without further explanation. categories: [travel, "
                           "education, parents, style & beauty, entertainment, food & drink, science & "
                           "technology, business, sports, healthy living, women, politics, crime, culture & "
                           "arts, religion] article: {text}",
            markers=("] article:", "article:"),
            question="Which category does this article belong to? Choose one of: {labels}. Answer with only the "
                     "category name.\narticle: {text}\ncategory:",
            answer_label="category:",
            retrieval_template="Which category does this article relate to among the following categories? arcicle: {text}",
            profile_instruction="Look at the following articles this journalist wrote and name the category they "
                                "write in most often. Answer in the form: most popular category: <category>.",
        ),
        Task(
            id="LaMP_2M", name="movie_tagging", kind="classification", labels=_LAMP2M_LABELS,
            profile_fields=("description", "tag"), max_new_tokens=8,
            source_field="description", target_field="tag",
            item_format=(("description", "description"), ("tag", "tag")),
            input_template="Which tag does this movie relate to among the following tags? Just answer with the tag "
                           "name without further explanation. tags: [sci-fi, based on a book, comedy, action, "
                           "twist ending, dystopia, dark comedy, classic, psychology, fantasy, romance, "
                           "thought-provoking, social commentary, violence, true story] description: {text}",
            markers=("] description:", "description:"),
            question="Which tag does this user give to this movie? Choose one of: {labels}. Answer with only the "
                     "tag.\ndescription: {text}\ntag:",
            answer_label="tag:",
            retrieval_template="Which tag does this movie relate to among the following tags? Just answer with the tag "
                               "name without further explanation.\n description: {text}",
            profile_instruction="Look at the following movies this user tagged and name the tag they use most "
                                "often for each kind of movie. Answer in the form: most popular tag: <tag>.",
        ),
        Task(
            id="LaMP_3", name="product_rating", kind="rating", labels=("1", "2", "3", "4", "5"),
            profile_fields=("text", "score"), max_new_tokens=4,
            source_field="text", target_field="score",
            item_format=(("review", "text"), ("score", "score")),
            input_template="What is the score of the following review on a scale of 1 to 5? just answer with 1, 2, "
                           "3, 4, or 5 without further explanation. review: {text}",
            markers=("without further explanation. review:", "review:"),
            question="What score from 1 to 5 does this user give with the following review? Answer with only one "
                     "digit: 1, 2, 3, 4 or 5.\nreview: {text}\nscore:",
            answer_label="score:",
            retrieval_template="What is the score of the following review on a scale of 1 to 5? review: {text}",
            profile_instruction="Based on this user's past reviews, what scores do they most often give for "
                                "positive and for negative reviews? Answer in the form: most common positive "
                                "score: <score>, most common negative score: <score>.",
        ),
        Task(
            id="LaMP_4", name="news_headline", kind="generation", labels=(),
            profile_fields=("text", "title"), max_new_tokens=40,
            source_field="text", target_field="title",
            item_format=(("article", "text"), ("headline", "title")),
            input_template="Generate a headline for the following article: {text}",
            markers=("Generate a headline for the following article:", "article:"),
            question="Write a headline for the following article in this author's style. Answer with only the "
                     "headline.\narticle: {text}\nheadline:",
            answer_label="headline:",
            retrieval_template="Generate a headline for the following article: {text}",
            profile_instruction="Given this author's previous articles, describe a template for their headlines, "
                                "specific about their style and wording, so that one could predict the headline "
                                "of one of their articles.",
        ),
        Task(
            id="LaMP_5", name="scholarly_title", kind="generation", labels=(),
            profile_fields=("title", "abstract"), max_new_tokens=40,
            source_field="abstract", target_field="title",
            item_format=(("abstract", "abstract"), ("title", "title")),
            input_template="Generate a title for the following abstract of a paper: {text}",
            markers=("Generate a title for the following abstract of a paper:", "abstract:"),
            question="Write a title for the following abstract of a paper in this author's style. Answer with only "
                     "the title.\nabstract: {text}\ntitle:",
            answer_label="title:",
            retrieval_template="Generate a title for the following abstract of a paper: {text}",
            profile_instruction="Given this author's previous publications, describe a template for their paper "
                                "titles so that one could predict a title from an abstract. Only write the "
                                "template description.",
        ),
        Task(
            id="LaMP_7", name="tweet_paraphrase", kind="generation", labels=(),
            profile_fields=("text",), max_new_tokens=48,
            source_field="text", target_field="text",
            item_format=(("tweet", "text"),),
            input_template="Paraphrase the following tweet without any explanation before or after it: {text}",
            markers=("without any explanation before or after it:", ":"),
            question="Paraphrase the following text into a tweet in this user's style. Answer with only the "
                     "tweet.\ntext: {text}\ntweet:",
            answer_label="tweet:",
            history_from_source=False,
            retrieval_template="Paraphrase the following text into tweet without any explanation before or after it: {text}",
            profile_instruction="Given this person's previous tweets, describe a template for their tweets (style, "
                                "punctuation, capitalization, wording, tone) so that a generic sentence could be "
                                "rephrased to sound like them. Only write the template description.",
        ),
    ]
    return {task.id: task for task in tasks}


TASKS: dict[str, Task] = _registry()
"""The seven tasks by id, in the paper's order."""


def get_task(task_id: str) -> Task:
    """The task with this id; raises UnknownTaskError naming the valid ids (and the closest one)."""
    task = TASKS.get(str(task_id))
    if task is None:
        by_lower = {key.lower(): key for key in TASKS}
        close = difflib.get_close_matches(str(task_id).lower(), list(by_lower), n=1)
        hint = f" (did you mean {by_lower[close[0]]}?)" if close else ""
        raise UnknownTaskError(f"unknown task {task_id!r}{hint}: use one of {', '.join(TASKS)}")
    return task


def as_task(task_or_id: Task | str) -> Task:
    """`task_or_id` itself when it is a Task, else the task with that id (see `get_task`)."""
    return task_or_id if isinstance(task_or_id, Task) else get_task(task_or_id)
