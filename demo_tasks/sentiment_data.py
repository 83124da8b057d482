"""demo-sentiment's examples: a short review in, `positive` or `negative` out.

Training reviews are generated from the templates below (original phrases written for this project);
the held-back reviews are written out by hand and share no template with them, so they measure whether
the soft prompt learnt the task, not the templates.
"""

from __future__ import annotations

import random

ASPECTS = ["The food", "The pasta", "The coffee", "The service", "The hotel room", "The bed", "The staff",
           "The delivery", "The battery", "The screen", "The film", "The plot", "The ending", "The book",
           "The app", "The update", "The price", "The concert", "The tour guide", "The checkout",
           "The shoes", "The jacket", "The headphones", "The train ride", "The customer support",
           "The soup", "The view", "The game", "The lesson", "The haircut"]
GOOD = ["was excellent", "was wonderful", "was great", "was delicious", "was fantastic", "was lovely",
        "exceeded my expectations", "was worth every penny", "made my day", "was a real pleasure",
        "was fast and friendly", "works perfectly", "was superb", "was clean and comfortable",
        "was brilliant", "felt like a treat", "was just right", "was a delight"]
BAD = ["was terrible", "was awful", "was cold and bland", "was a waste of money", "was disappointing",
       "broke after two days", "was rude and slow", "was dirty", "was a complete mess", "never arrived",
       "was boring", "keeps crashing", "was far too expensive", "made me angry", "was the worst I have had",
       "fell apart", "was noisy and cramped", "was a letdown"]
GOOD_CLOSERS = ["Highly recommended.", "I will come back.", "Five stars.", "I loved it.", "Would buy again.", ""]
BAD_CLOSERS = ["Never again.", "Avoid it.", "One star.", "I want a refund.", "Not recommended.", ""]

HELD_BACK = [
    ("The food was cold and the waiter was rude.", "negative"),
    ("Best pizza I have eaten in years, and the staff were so kind.", "positive"),
    ("I waited an hour for a table and nobody apologised.", "negative"),
    ("The room smelled of smoke and the sheets were stained.", "negative"),
    ("Lovely little hotel with a view of the harbour.", "positive"),
    ("My package came a day early and everything was in perfect shape.", "positive"),
    ("The charger stopped working within a week.", "negative"),
    ("This phone is quick, light and the camera is stunning.", "positive"),
    ("I laughed from start to finish, what a clever film.", "positive"),
    ("Two hours of my life I will never get back.", "negative"),
    ("The story dragged and the actors seemed bored.", "negative"),
    ("A warm, moving book that I could not put down.", "positive"),
    ("The app logs me out every time I open it.", "negative"),
    ("Setting it up took two minutes and it just works.", "positive"),
    ("The bus was late again and the driver ignored us.", "negative"),
    ("Our guide knew every corner of the old town and made it fun.", "positive"),
    ("The soup tasted of nothing and cost a fortune.", "negative"),
    ("Fresh bread, strong coffee, friendly faces. Perfect breakfast.", "positive"),
    ("They charged my card twice and support never answered.", "negative"),
    ("The teacher explained everything clearly and patiently.", "positive"),
    ("The sweater shrank after the first wash.", "negative"),
    ("Comfortable shoes, I walked all day without a blister.", "positive"),
    ("The concert was loud in the best way, the band was on fire.", "positive"),
    ("The sound kept cutting out and the seats were broken.", "negative"),
    ("Great value for the price, I am very happy with it.", "positive"),
    ("Cheap plastic that cracked the first time I dropped it.", "negative"),
    ("The nurse was gentle and took time to answer my questions.", "positive"),
    ("The instructions made no sense and two screws were missing.", "negative"),
    ("What a beautiful garden, we spent the whole afternoon there.", "positive"),
    ("The pool was closed and nobody told us before we booked.", "negative"),
    ("The game is addictive and the music is gorgeous.", "positive"),
    ("Endless ads and it drains my battery.", "negative"),
    ("My haircut looks exactly like the photo I showed them.", "positive"),
    ("The fish was raw in the middle and the chips were soggy.", "negative"),
    ("Delivery was quick and the driver was very polite.", "positive"),
    ("I asked for a quiet room and got one next to the lift.", "negative"),
    ("The museum was fascinating and not at all crowded.", "positive"),
    ("The headphones hurt my ears after ten minutes.", "negative"),
    ("A friendly shop with fair prices and honest advice.", "positive"),
    ("The train was cancelled and we got no refund.", "negative"),
]


def training_examples(count: int, seed: int = 0) -> list[dict]:
    """`count` generated reviews, half of each label, as {"prompt", "completion"} records."""
    rng = random.Random(seed)
    records = []
    for i in range(count):
        is_good = i % 2 == 0
        phrases, closers = (GOOD, GOOD_CLOSERS) if is_good else (BAD, BAD_CLOSERS)
        first, second = rng.sample(ASPECTS, 2)
        text = f"{first} {rng.choice(phrases)}"
        if rng.random() < 0.4:  # two clauses of the same feeling
            text += f" and {second.lower()} {rng.choice(phrases)}"
        text = f"{text}. {rng.choice(closers)}".strip()
        records.append({"prompt": text, "completion": "positive" if is_good else "negative"})
    rng.shuffle(records)
    return records


def held_back_examples() -> list[dict]:
    """The hand-written reviews the tests score the task on (never trained on)."""
    return [{"prompt": text, "completion": label} for text, label in HELD_BACK]
