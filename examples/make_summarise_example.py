"""Write examples/summarise-1000.jsonl: the seed docs' "Large-Scale Text Processing" example.

1,000 chat requests (custom_id text-0 .. text-999) asking a model to summarise a document in
one sentence. The documents are short, varied, made-up news items built from templates with a
fixed random seed, so the file is the same on every run and every Python >= 3.10.

    python examples/make_summarise_example.py [--count 1000] [--output PATH]
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

MODEL = "meta-llama/Llama-3.2-3B-Instruct-Turbo"
PROMPT = "Summarize the following document in one sentence: {text}"
SEED = 20240601

CITIES = [
    "Lisbon", "Osaka", "Nairobi", "Calgary", "Porto Alegre", "Gdansk", "Adelaide", "Tampere",
    "Valparaiso", "Kochi", "Leeds", "Tucson", "Ghent", "Da Nang", "Bergen", "Cork",
]
COMPANIES = [
    "Northwind Logistics", "Bluefin Robotics", "Harbor & Vale", "Quillstone Software",
    "Meridian Foods", "Atlas Grid", "Copperleaf Health", "Tidewater Energy", "Lumen Textiles",
]
PRODUCTS = [
    "a battery that charges in twelve minutes", "a route-planning service for delivery vans",
    "a soil sensor for small farms", "an open-source database engine",
    "a recyclable coffee capsule", "a hearing aid with a week-long battery",
]
SPECIES = ["kingfishers", "otters", "bumblebees", "salamanders", "grey herons", "natterjack toads"]
WEEKDAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday"]
MONTHS = ["January", "March", "April", "June", "August", "September", "October", "November"]


def _council_vote(rng: random.Random) -> str:
    city = rng.choice(CITIES)
    yes = rng.randint(7, 12)
    no = rng.randint(1, yes - 1)
    cost = rng.randint(4, 60)
    return (
        f"The city council of {city} voted {yes} to {no} on {rng.choice(WEEKDAYS)} to approve "
        f"a {cost} million euro plan to rebuild the harbour footbridge, closed since a storm in "
        f"{rng.choice(MONTHS)}. Supporters said the crossing carried {rng.randint(3, 15)},000 "
        "people a day and that its closure had hurt shops on both banks. Opponents argued the "
        "money should go to school repairs first. Work is due to start next spring and to take "
        f"{rng.randint(14, 30)} months."
    )


def _earnings(rng: random.Random) -> str:
    company = rng.choice(COMPANIES)
    change = rng.randint(2, 35)
    direction = rng.choice(["rose", "fell"])
    return (
        f"{company} said quarterly revenue {direction} {change} percent, to "
        f"{rng.randint(120, 980)} million dollars, as demand for its services "
        f"{'grew' if direction == 'rose' else 'slowed'} in Europe and Asia. The chief executive "
        f"told analysts the company would hire {rng.randint(50, 400)} engineers this year and "
        "keep its dividend unchanged. Shares moved "
        f"{rng.randint(1, 9)} percent in early trading."
    )


def _product_launch(rng: random.Random) -> str:
    company = rng.choice(COMPANIES)
    return (
        f"{company} unveiled {rng.choice(PRODUCTS)} at a trade fair in {rng.choice(CITIES)}. "
        f"The company says a pilot with {rng.randint(10, 90)} customers cut their costs by about "
        f"{rng.randint(5, 40)} percent. Independent reviewers were cautious, noting that the "
        "pilot was short and run by the company itself. Sales begin in "
        f"{rng.choice(MONTHS)} at a price the company has not yet disclosed."
    )


def _wildlife(rng: random.Random) -> str:
    species = rng.choice(SPECIES)
    before = rng.randint(10, 60)
    after = before + rng.randint(5, 80)
    return (
        f"Volunteers counting {species} along the river near {rng.choice(CITIES)} recorded "
        f"{after} animals this year, up from {before} five years ago. Ecologists credit the "
        "removal of two old weirs and a ban on mowing the banks in early summer. The survey "
        f"team, {rng.randint(20, 120)} people strong, plans to repeat the count every "
        f"{rng.choice(['spring', 'autumn'])} and publish the raw data online."
    )


def _weather(rng: random.Random) -> str:
    city = rng.choice(CITIES)
    return (
        f"Heavy rain left parts of {city} under water on {rng.choice(WEEKDAYS)}, after "
        f"{rng.randint(60, 180)} millimetres fell in under a day. Trains were suspended on "
        f"{rng.randint(2, 6)} lines and {rng.randint(30, 400)} households were evacuated as a "
        "precaution. Forecasters expect the weather to clear by the weekend, but warned that "
        "rivers would stay high for several days."
    )


def _research(rng: random.Random) -> str:
    participants = rng.randint(200, 5000)
    return (
        f"A study of {participants} adults published this week found that people who walked for "
        f"at least {rng.randint(15, 45)} minutes a day slept on average "
        f"{rng.randint(12, 40)} minutes longer than those who did not. The authors, from a "
        f"university in {rng.choice(CITIES)}, stress that the study shows an association, not "
        "cause and effect, and call for a randomised trial."
    )


TEMPLATES = [_council_vote, _earnings, _product_launch, _wildlife, _weather, _research]


def make_documents(count: int, *, seed: int = SEED) -> list[str]:
    """`count` made-up news items, the same for the same seed."""
    rng = random.Random(seed)
    return [rng.choice(TEMPLATES)(rng) for _ in range(count)]


def make_requests(documents: list[str]) -> list[dict[str, object]]:
    """The batch request lines, exactly as the seed docs build them."""
    return [
        {
            "custom_id": f"text-{index}",
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": {
                "model": MODEL,
                "messages": [{"role": "user", "content": PROMPT.format(text=text)}],
                "max_tokens": 200,
                "temperature": 0.3,
            },
        }
        for index, text in enumerate(documents)
    ]


def main() -> None:
    """Write the example file."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=1000, help="number of documents (1000)")
    parser.add_argument(
        "--output",
        type=Path,
        default=Path(__file__).with_name("summarise-1000.jsonl"),
        help="where to write the JSONL file (examples/summarise-1000.jsonl)",
    )
    args = parser.parse_args()
    requests = make_requests(make_documents(args.count))
    with args.output.open("w", encoding="utf-8", newline="\n") as out:
        for request in requests:
            out.write(json.dumps(request) + "\n")
    print(f"wrote {len(requests)} requests to {args.output}")


if __name__ == "__main__":
    main()
