"""demo-json's examples: a sentence about a person in, a JSON object of their name, age and city out.

Sentences are generated from templates (written for this project). The held-back ones use names, cities
and sentence templates that the training examples never use.
"""

from __future__ import annotations

import json
import random

TRAIN_NAMES = ["Maria Silva", "Tom Becker", "Aisha Khan", "Lukas Novak", "Emma Rossi", "Kenji Sato",
               "Sofia Garcia", "Oliver Brown", "Nadia Petrova", "Samuel Okafor", "Clara Jensen", "Diego Lopez",
               "Hannah Weiss", "Ravi Patel", "Julia Kowalski", "Pierre Martin", "Mei Chen", "Noah Wilson",
               "Fatima Haddad", "Erik Larsen", "Lea Dubois", "Marco Bianchi", "Amara Diallo", "Ivan Horvat"]
TRAIN_CITIES = ["Lisbon", "Berlin", "Lahore", "Prague", "Milan", "Osaka", "Seville", "Leeds", "Kazan", "Lagos",
                "Aarhus", "Quito", "Vienna", "Pune", "Krakow", "Lyon", "Chengdu", "Denver", "Beirut", "Bergen",
                "Nantes", "Turin", "Dakar", "Zagreb"]
HELD_NAMES = ["Greta Holm", "Yusuf Demir", "Alice Moreau", "Tariq Aziz", "Ingrid Berg", "Paolo Conti",
              "Zara Ahmed", "Felix Wagner", "Lina Haddad", "Hugo Lambert"]
HELD_CITIES = ["Oslo", "Izmir", "Bordeaux", "Cairo", "Uppsala", "Naples", "Karachi", "Hamburg", "Tunis",
               "Geneva"]
TRAIN_TEMPLATES = ["{name} is {age} and lives in {city}.", "{name}, {age}, works in {city}.",
                   "Meet {name}: {age} years old, from {city}.", "At {age}, {name} moved to {city}.",
                   "{name} ({age}) lives in {city}.", "{name} lives in {city} and turned {age} this year.",
                   "{city} resident {name} is {age} years old.", "Name: {name}. Age: {age}. Home: {city}.",
                   "{name} is a {age}-year-old teacher in {city}.", "Born {age} years ago, {name} now lives in {city}.",
                   "In {city} lives {name}, aged {age}.", "{city} is where {name} lives; {name} is {age}.",
                   "My cousin {name} is {age} and lives in {city}.", "Our teacher {name}, {age}, comes from {city}.",
                   "The new manager, {name}, is {age} and was raised in {city}.",
                   "{age}-year-old {name} runs a cafe in {city}.", "From {city}: {name}, {age}, a nurse.",
                   "Last year {name} ({age}) left {city} for a month and came back.",
                   "Everyone in {city} knows {name}, who just turned {age}.",
                   "I met {name} in {city}; he is {age}.", "Guest: {name}, age {age}, city of residence {city}.",
                   "In {city}, {name} ({age}) teaches music to children.",
                   "{city}'s best known cyclist is {name}, {age}.", "The {city} office hired {name}, who is {age}.",
                   "My dentist {name} is {age} and works in {city}.", "Our landlord, {name}, is {age}; he lives in {city}.",
                   "Her coach {name} turned {age} in {city} last week.",
                   "The winner, {name} ({age}), travelled from {city}.",
                   "A {age}-year-old from {city}, {name}, won the chess cup.",
                   "{city} welcomed {name} home; she is {age} now.", "Please greet {name} ({age}) from {city}.",
                   "Tonight's speaker is {name}, {age}, of {city}."]
HELD_TEMPLATES = ["{city} is home to {name}, who is {age}.",
                  "{name} turned {age} last spring and still lives in {city}.",
                  "Our new neighbour {name} is {age} and grew up in {city}.",
                  "Say hello to {name}, {age}, a baker from {city}."]


def answer(name: str, age: int, city: str) -> str:
    """The completion: compact JSON, keys in a fixed order."""
    return json.dumps({"name": name, "age": age, "city": city})


def _examples(count: int, names, cities, templates, seed: int) -> list[dict]:
    rng = random.Random(seed)
    records = []
    for i in range(count):
        name, city, age = rng.choice(names), rng.choice(cities), rng.randint(18, 90)
        text = templates[i % len(templates)].format(name=name, age=age, city=city)
        records.append({"prompt": text, "completion": answer(name, age, city)})
    rng.shuffle(records)
    return records


def training_examples(count: int, seed: int = 0) -> list[dict]:
    """`count` generated sentences with their JSON answers, as {"prompt", "completion"} records."""
    return _examples(count, TRAIN_NAMES, TRAIN_CITIES, TRAIN_TEMPLATES, seed)


def held_back_examples(count: int = 20, seed: int = 1) -> list[dict]:
    """Sentences of unseen names, cities and templates, that the tests score the task on."""
    return _examples(count, HELD_NAMES, HELD_CITIES, HELD_TEMPLATES, seed)
