"""Write the demo's prompts: short product reviews to label `positive` or `negative`.

    python prompts/demo/make_prompts.py          # rewrites train.jsonl and eval.jsonl next to it

Deterministic (seeded): the same files come out every time. Each row is
{"id": ..., "prompt": "Review: ...", "reference": "positive" | "negative"}, half of each label.
Train and eval share no prompt, and neither repeats a worked example of system.md.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

SEED = 20261129
N_TRAIN = 400
N_EVAL = 64
HERE = Path(__file__).parent

ITEMS = ["blender", "jacket", "phone case", "backpack", "desk lamp", "kettle", "pair of headphones"]
ITEMS += [
    "desk chair",
    "umbrella",
    "novel",
    "frying pan",
    "keyboard",
    "water bottle",
    "tent",
    "watch",
]
ITEMS += ["pair of boots", "coffee grinder", "board game", "yoga mat", "suitcase"]
# Adjectives and clauses that carry the sentiment; the templates around them are neutral.
WORDS = {
    "positive": ["great", "excellent", "wonderful", "sturdy", "lovely", "superb", "reliable"],
    "negative": ["terrible", "awful", "flimsy", "disappointing", "useless", "cheap", "poor"],
}
CLAUSES = {
    "positive": [
        "I would buy it again",
        "it works perfectly",
        "my whole family loves it",
        "it was worth every penny",
        "it exceeded my expectations",
    ],
    "negative": [
        "I returned it after a week",
        "it stopped working quickly",
        "I regret buying it",
        "it was a waste of money",
        "it fell apart in days",
    ],
}
TEMPLATES = [
    "The {item} is {a} and {b}. {Clause}.",
    "I bought this {item} last month. It feels {a}, and {clause}.",
    "{Clause}. The {item} looks {a} and the build is {b}.",
    "My new {item} arrived on time. Honestly {a} quality; {clause}.",
    "A {a} {item} with a {b} finish. {Clause}.",
    "Got the {item} as a gift. It is {a}, and {clause}.",
]


def make_review(rng: random.Random, label: str) -> str:
    a, b = rng.sample(WORDS[label], 2)
    clause = rng.choice(CLAUSES[label])
    text = rng.choice(TEMPLATES).format(
        item=rng.choice(ITEMS), a=a, b=b, clause=clause, Clause=clause[0].upper() + clause[1:]
    )
    return text[0].upper() + text[1:]


def main() -> None:
    rng = random.Random(SEED)
    seen: set[str] = set()
    rows: list[tuple[str, str]] = []
    while len(rows) < N_TRAIN + N_EVAL:
        label = ("positive", "negative")[len(rows) % 2]  # balanced labels
        review = make_review(rng, label)
        if review not in seen:
            seen.add(review)
            rows.append((review, label))
    rng.shuffle(rows)
    for split, part in (("train", rows[:N_TRAIN]), ("eval", rows[N_TRAIN:])):
        with open(HERE / f"{split}.jsonl", "w") as f:
            for i, (review, label) in enumerate(part, start=1):
                # `split` lands in the row's meta; `distill build` (split_field: split) keeps it
                row = {
                    "id": f"{split}-{i:04d}",
                    "prompt": f"Review: {review}",
                    "reference": label,
                    "split": split,
                }
                f.write(json.dumps(row) + "\n")
        print(f"wrote {len(part)} rows to {HERE / f'{split}.jsonl'}")


if __name__ == "__main__":
    main()
