"""A small fictional world, generated deterministically from a seed.

It yields the pre-training corpus of nbtune's embedded base model and the rows of the built-in datasets. The
downstream facts (capitals, regions, languages) and label words appear in ordinary corpus sentences, so a
pre-trained base knows them for held-out countries while a random one cannot.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass

REGIONS = ("north", "south", "east", "west")
SENTIMENTS = ("positive", "negative")

CAPITAL_QUESTION = "Q: What is the capital of {country}?\nA:"
REGION_CLOZE = "The country of {country} lies in the"
LANGUAGE_CLOZE = "People in {country} speak"
# the assistant's fixed answer forms in the chat datasets; both are sentences of the pre-training corpus
CAPITAL_ANSWER = "The capital of {name} is {capital}."
LANGUAGE_ANSWER = "People in {name} speak {language}."


def _words(text: str) -> tuple[str, ...]:
    return tuple(text.split())


_ONSETS = _words("b d f g k l m n p r s t v z br dr kr tr th sh st gl pl vr")
_VOWELS = ("a", "e", "i", "o", "u", "a", "e", "o", "ae", "ia", "ou", "ei")
_CODAS = ("", "", "", "n", "r", "l", "s", "m", "th", "nd", "rk")
_COUNTRY_ENDINGS = ("ia", "land", "ora", "esh", "ar", "istan", "ovia", "enia", "os", "ea", "and", "un")
_CITY_ENDINGS = ("ton", "grad", "burg", "vel", "mar", "port", "holm", "ford", "heim", "dor", "opol", "is")
_EXPORTS = _words(
    "copper wool tea salt timber rice silver glass cotton fish coffee iron wine cheese paper spices"
)
_PEOPLE = _words("Mira Tom Anna Leo Sara Ben Nora Ivan Lena Omar Kira Paul Rosa Hugo Ella Sam")
_SHE = frozenset(_words("Mira Anna Sara Nora Lena Kira Rosa Ella"))
_PRONOUNS = {p: "she" if p in _SHE else "he" for p in _PEOPLE}
_PRODUCTS = _words(
    "lamp kettle chair phone book jacket backpack blender camera desk pillow watch bicycle toaster umbrella speaker"
)
_GOOD = _words("great wonderful excellent lovely perfect fantastic sturdy comfortable reliable beautiful")
_BAD = _words("terrible awful broken poor disappointing flimsy useless noisy cheap ugly")
_GOOD_CLOSINGS = (
    "I love it.",
    "I would buy it again.",
    "Highly recommended.",
    "It works very well.",
    "My family is happy with it.",
    "Worth every coin.",
)
_BAD_CLOSINGS = (
    "I hate it.",
    "I want my money back.",
    "Do not buy it.",
    "It stopped working.",
    "I returned it.",
    "What a waste of money.",
)
_TIMES = _words("week month year summer winter spring")
_FRUITS = _words("apple pear cherry plum grape lemon mango peach melon fig")
_COLOURS = _words("red blue green yellow black white orange purple brown grey")
_NUMBER_WORDS = _words("zero one two three four five six seven eight nine ten eleven twelve")
_DAYS = _words("Monday Tuesday Wednesday Thursday Friday Saturday Sunday")


@dataclass(frozen=True)
class Country:
    """One fictional country and its facts."""

    name: str
    capital: str
    region: str
    language: str
    export: str


@dataclass(frozen=True)
class World:
    """All countries, split into those whose downstream rows may be trained on and those held out for eval."""

    countries: tuple[Country, ...]
    train_countries: tuple[Country, ...]
    eval_countries: tuple[Country, ...]


def _word(rng: random.Random, syllables: int, endings: tuple[str, ...]) -> str:
    parts = [rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS) for _ in range(syllables)]
    return ("".join(parts) + rng.choice(endings)).capitalize()


def make_world(seed: int = 0, n_countries: int = 540, n_eval: int = 120) -> World:
    """Invent `n_countries` countries with balanced regions; hold out `n_eval` of them (balanced too)."""
    rng = random.Random(seed)
    used: set[str] = set()

    def fresh(syllables: tuple[int, ...], endings: tuple[str, ...]) -> str:
        while True:
            name = _word(rng, rng.choice(syllables), endings)
            if name not in used and 4 <= len(name) <= 11:
                used.add(name)
                return name

    languages = [fresh((1, 2), ("ic", "ish", "ese", "i")) for _ in range(24)]
    countries = [
        Country(
            name=fresh((1, 2), _COUNTRY_ENDINGS),
            capital=fresh((1, 2), _CITY_ENDINGS),
            region=REGIONS[i % len(REGIONS)],
            language=rng.choice(languages),
            export=rng.choice(_EXPORTS),
        )
        for i in range(n_countries)
    ]
    rng.shuffle(countries)
    held_out: list[Country] = []
    for region in REGIONS:
        held_out += [c for c in countries if c.region == region][: n_eval // len(REGIONS)]
    rng.shuffle(held_out)  # so that any prefix of the eval split mixes regions
    held = {c.name for c in held_out}
    return World(
        countries=tuple(countries),
        train_countries=tuple(c for c in countries if c.name not in held),
        eval_countries=tuple(held_out),
    )


# --- pre-training corpus ------------------------------------------------------------------------------------

_FACT_TEMPLATES = (
    CAPITAL_ANSWER,
    "{capital} is the capital of {name}.",
    "{capital} is the capital city of {name}.",
    "The capital city of {name} is {capital}.",
    "The government of {name} sits in {capital}.",
    "Most visitors to {name} first arrive in {capital}, the capital.",
    "{name} is a country in the {region}.",
    "{name} lies in the {region}.",
    "{name} is in the {region} of the world.",
    "The country of {name} is found in the {region}.",
    "{capital}, a city in the {region}, is the capital of {name}.",
    LANGUAGE_ANSWER,
    "The main language of {name} is {language}.",
    "{name} exports {export}.",
    "The best known export of {name} is {export}.",
)


def _country_profile(rng: random.Random, c: Country) -> str:
    facts = [t.format(**vars(c)) for t in rng.sample(_FACT_TEMPLATES, rng.randint(3, 6))]
    return " ".join(facts)


def _travel_story(rng: random.Random, c: Country, other: Country) -> str:
    person = rng.choice(_PEOPLE)
    she = _PRONOUNS[person]
    lines = [
        f"{person} travelled to {c.name}, a country in the {c.region}.",
        f"{she.capitalize()} stayed in {c.capital}, the capital of {c.name}.",
        rng.choice(
            [
                f"In {c.capital} {she} bought some {c.export}.",
                f"{she.capitalize()} learned a few words of {c.language}.",
                f"The people of {c.capital} were kind to {'her' if she == 'she' else 'him'}.",
            ]
        ),
        f"Then {she} went on to {other.capital}, the capital of {other.name}, in the {other.region}.",
    ]
    return " ".join(lines)


def _region_list(rng: random.Random, countries: tuple[Country, ...]) -> str:
    region = rng.choice(REGIONS)
    names = [c.name for c in rng.sample([c for c in countries if c.region == region], rng.randint(3, 6))]
    return f"Countries in the {region}: {', '.join(names)}."


def _capital_list(rng: random.Random, countries: tuple[Country, ...]) -> str:
    picks = rng.sample(countries, rng.randint(3, 5))
    return "Capitals: " + "; ".join(f"{c.name}, {c.capital}" for c in picks) + "."


def _review(rng: random.Random, sentiment: str) -> str:
    """A product review whose wording carries its sentiment; no label sentence."""
    words, closings = (_GOOD, _GOOD_CLOSINGS) if sentiment == "positive" else (_BAD, _BAD_CLOSINGS)
    a, b = rng.sample(words, 2)
    product = rng.choice(_PRODUCTS)
    opener = rng.choice(
        [
            f"I bought this {product} last {rng.choice(_TIMES)}.",
            f"This {product} arrived quickly.",
            f"My {product} came in a box.",
            f"I got a {product} for my friend.",
        ]
    )
    body = rng.choice(
        [f"It is {a} and {b}.", f"The {product} is {a}.", f"Honestly, {a} and {b}.", f"The quality is {a}."]
    )
    return f"{opener} {body} {rng.choice(closings)}"


def _arithmetic(rng: random.Random) -> str:
    a, b = rng.randint(0, 20), rng.randint(0, 20)
    if rng.random() < 0.5:
        return f"Q: What is {a} plus {b}?\nA: {a + b}"
    a, b = max(a, b), min(a, b)
    return rng.choice(
        [f"{a} plus {b} is {a + b}.", f"{a} minus {b} is {a - b}.", f"Q: What is {a} minus {b}?\nA: {a - b}"]
    )


def _list_doc(rng: random.Random) -> str:
    kind = rng.randrange(5)
    if kind == 0:
        items = rng.sample(_FRUITS, rng.randint(2, 5))
        return f"Here is a list of fruits: {', '.join(items)}."
    if kind == 1:
        items = rng.sample(_COLOURS, rng.randint(2, 5))
        return f"Q: Name some colours.\nA: {', '.join(items)}"
    if kind == 2:
        start = rng.randint(0, 8)
        return "Counting: " + ", ".join(_NUMBER_WORDS[start : start + rng.randint(3, 5)]) + "."
    if kind == 3:
        start = rng.randint(0, 4)
        return "The days are " + ", ".join(_DAYS[start : start + 3]) + "."
    items = rng.sample(_FRUITS, 3)
    return f"Sorted: {', '.join(sorted(items))}."


def _story(rng: random.Random, world: World) -> str:
    person, friend = rng.sample(_PEOPLE, 2)
    she = _PRONOUNS[person]
    c = rng.choice(world.countries)
    fruit, colour = rng.choice(_FRUITS), rng.choice(_COLOURS)
    day = rng.choice(_DAYS)
    return (
        f"Once upon a time, {person} lived in {c.capital}. On {day} {she} met {friend} at the market. "
        f"They shared some {fruit}s and talked about a {colour} {rng.choice(_PRODUCTS)}. "
        f"{rng.choice(['It was a happy day.', 'It rained all day.', 'They laughed a lot.'])} The end."
    )


def corpus_documents(world: World, seed: int = 0, target_bytes: int = 6_000_000) -> Iterator[str]:
    """Yield pre-training documents until about `target_bytes` of text; every country is covered evenly."""
    rng = random.Random(seed * 7919 + 1)
    countries = world.countries
    written = 0
    while written < target_bytes:
        roll = rng.random()
        if roll < 0.40:
            doc = _country_profile(rng, rng.choice(countries))
        elif roll < 0.52:
            doc = _travel_story(rng, *rng.sample(countries, 2))
        elif roll < 0.57:
            doc = _region_list(rng, countries)
        elif roll < 0.62:
            doc = _capital_list(rng, countries)
        elif roll < 0.76:
            sentiment = rng.choice(SENTIMENTS)
            label = rng.choice([f"Overall the review is {sentiment}.", f"This review is {sentiment}.", ""])
            doc = f"{_review(rng, sentiment)} {label}".strip()
        elif roll < 0.86:
            doc = _arithmetic(rng)
        elif roll < 0.93:
            doc = _list_doc(rng)
        else:
            doc = _story(rng, world)
        written += len(doc) + 1
        yield doc


# --- downstream datasets ------------------------------------------------------------------------------------


def _capital_row(c: Country) -> dict:
    return {
        "country": c.name,
        "prompt": CAPITAL_QUESTION.format(country=c.name),
        "completion": f" {c.capital}",
    }


def _region_row(c: Country) -> dict:
    return {"country": c.name, "text": REGION_CLOZE.format(country=c.name), "label": c.region}


def _language_rows(
    world: World, seed: int, n_languages: int = 8, n_eval: int = 13, n_train: int = 14
) -> dict[str, list[dict]]:
    """The language task: countries of the `n_languages` most spoken languages, `n_eval` (and up to `n_train`)
    per language; eval countries are held out of train; eval is balanced, train nearly so (10-14 a class)."""
    rng = random.Random(seed * 15485863 + 3)
    counts: dict[str, int] = {}
    for c in world.countries:
        counts[c.language] = counts.get(c.language, 0) + 1
    languages = sorted(counts, key=lambda lang: (-counts[lang], lang))[:n_languages]
    splits: dict[str, list[dict]] = {"train": [], "eval": []}
    for lang in languages:
        speakers = [c for c in world.countries if c.language == lang]
        for split, chosen in (("eval", speakers[:n_eval]), ("train", speakers[n_eval : n_eval + n_train])):
            splits[split] += [
                {"country": c.name, "text": LANGUAGE_CLOZE.format(country=c.name), "label": c.language}
                for c in chosen
            ]
    for rows in splits.values():
        rng.shuffle(rows)
    return splits


_CAPITAL_ASKS = (
    "What is the capital of {name}?",
    "Which city is the capital of {name}?",
    "Name the capital of {name}.",
)
_LANGUAGE_ASKS = ("What language do people in {name} speak?", "Which language is spoken in {name}?")
_FOLLOW_UP = "And what language do people speak there?"
_SYSTEM_PROMPTS = ("You are a helpful assistant.", "Answer in one sentence.")
_REPLY_REQUESTS = {"name": "Reply with just the name.", "sentence": "Reply in a full sentence."}  # prefs
_REPLY_FORMS = tuple(_REPLY_REQUESTS)


def _chat_prompt(rng: random.Random, c: Country) -> tuple[list[dict], str, str]:
    """A conversation about `c` that ends in a user question, its answer in the fixed form and what it asks
    ("capital" or "language"): sometimes with a system message, sometimes two turns (the capital, then a
    follow-up about the language)."""
    messages = [{"role": "system", "content": rng.choice(_SYSTEM_PROMPTS)}] if rng.random() < 1 / 3 else []
    kind = rng.choice(("capital", "language", "follow-up"))
    if kind == "follow-up":
        messages += [
            {"role": "user", "content": rng.choice(_CAPITAL_ASKS).format(**vars(c))},
            {"role": "assistant", "content": CAPITAL_ANSWER.format(**vars(c))},
            {"role": "user", "content": _FOLLOW_UP},
        ]
        return messages, LANGUAGE_ANSWER.format(**vars(c)), "language"
    asks, answer = (_CAPITAL_ASKS, CAPITAL_ANSWER) if kind == "capital" else (_LANGUAGE_ASKS, LANGUAGE_ANSWER)
    messages.append({"role": "user", "content": rng.choice(asks).format(**vars(c))})
    return messages, answer.format(**vars(c)), kind


def _bare_answer(c: Country, asked: str) -> str:
    """The fact asked about `c`, as just the name: "Futhheim." (the full sentence is CAPITAL_ANSWER's or LANGUAGE_ANSWER's)."""
    return f"{c.capital if asked == 'capital' else c.language}."


def _conversations(world: World, rng: random.Random, sizes: tuple[int, int],
                   row: Callable[[Country], dict]) -> dict[str, list[dict]]:
    """{split: rows}: `row(country)` for `sizes` train countries sampled from the world's train countries, and
    for the first eval countries (held out)."""
    countries = {"train": rng.sample(world.train_countries, sizes[0]), "eval": list(world.eval_countries[: sizes[1]])}
    return {split: [row(c) for c in chosen] for split, chosen in countries.items()}


def _chat_rows(world: World, seed: int, sizes: tuple[int, int] = (200, 100)) -> dict[str, list[dict]]:
    """Conversations ending in the assistant's answer, with that answer as the exact-match reference."""
    rng = random.Random(seed * 32452843 + 4)

    def row(c: Country) -> dict:
        messages, answer, _ = _chat_prompt(rng, c)
        return {"country": c.name, "messages": [*messages, {"role": "assistant", "content": answer}],
                "answer": answer}

    return _conversations(world, rng, sizes, row)


def _preference_rows(world: World, seed: int, sizes: tuple[int, int] = (200, 100)) -> dict[str, list[dict]]:
    """Preference pairs in the conversational prompt/chosen/rejected form, both answers stating the right fact:
    the last user turn asks for a reply form (just the name, or a full sentence; half the rows of each split
    each), chosen follows it and rejected follows the other. A base's leaning towards either form counts for
    as many rows as it counts against, so only a model that reads the request prefers chosen."""
    rng = random.Random(seed * 49979687 + 5)
    # _conversations makes the train rows, then the eval rows: one balanced, shuffled list of forms for each
    forms = iter([form for n in sizes for form in rng.sample(_REPLY_FORMS * (n // 2) + _REPLY_FORMS[: n % 2], n)])

    def row(c: Country) -> dict:
        messages, sentence, asked = _chat_prompt(rng, c)
        if messages[0]["role"] == "system":  # "Answer in one sentence." would contradict half the requests
            messages[0]["content"] = _SYSTEM_PROMPTS[0]
        form = next(forms)
        messages[-1]["content"] += " " + _REPLY_REQUESTS[form]
        answers = {"name": _bare_answer(c, asked), "sentence": sentence}
        other = next(f for f in _REPLY_FORMS if f != form)
        return {"country": c.name, "prompt": messages, "chosen": [{"role": "assistant", "content": answers[form]}],
                "rejected": [{"role": "assistant", "content": answers[other]}]}

    return _conversations(world, rng, sizes, row)


def dataset_rows(
    world: World, seed: int = 0, n_sentiment: tuple[int, int] = (600, 150)
) -> dict[str, dict[str, list[dict]]]:
    """Rows of every built-in dataset: {name: {split: rows}}. Eval rows of knowledge tasks use held-out countries
    (the world's for capitals, regions, chat and prefs; languages holds out its own, balanced by language)."""
    rng = random.Random(seed * 104729 + 2)
    sentiment: dict[str, list[dict]] = {}
    for split, n in zip(("train", "eval"), n_sentiment, strict=True):
        labels = [SENTIMENTS[i % 2] for i in range(n)]
        rng.shuffle(labels)
        sentiment[split] = [{"text": _review(rng, label), "label": label} for label in labels]
    return {
        "capitals": {
            "train": [_capital_row(c) for c in world.train_countries],
            "eval": [_capital_row(c) for c in world.eval_countries],
        },
        "regions": {
            "train": [_region_row(c) for c in world.train_countries],
            "eval": [_region_row(c) for c in world.eval_countries],
        },
        "sentiment": sentiment,
        "languages": _language_rows(world, seed),
        "chat": _chat_rows(world, seed),
        "prefs": _preference_rows(world, seed),
    }
