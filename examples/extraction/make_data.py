"""Generates the demo skill data set: pull name, age, job and city out of one English sentence into JSON.

SmolLM2-135M-Instruct answers these with chatty text or JSON with the wrong keys/values; a LoRA adapter learns
the format and the extraction in a few minutes of CPU training. ``evaluate.py`` scores a model's greedy replies
by exact match of the parsed JSON object.

Run ``python examples/extraction/make_data.py`` (deterministic; ``--seed`` changes it) to rewrite
``train.jsonl`` (chat ``messages`` records) and ``heldout.jsonl`` next to this file.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

FIRST = ["Maria", "John", "Aiko", "Pedro", "Fatima", "Liam", "Chen", "Olga", "Kwame", "Sofia", "Ravi", "Emma",
         "Tomas", "Leila", "Hiro", "Grace", "Mateo", "Anya", "Omar", "Ingrid", "Diego", "Nadia", "Felix", "Zara",
         "Ivan", "Priya", "Lucas", "Mei", "Samuel", "Elena", "Jonas", "Amara", "Victor", "Hana", "Rosa", "Yusuf"]
LAST = ["Lopez", "Smith", "Tanaka", "Silva", "Khan", "Murphy", "Wang", "Petrova", "Mensah", "Rossi", "Patel",
        "Brown", "Novak", "Haddad", "Sato", "Okafor", "Garcia", "Ivanova", "Farouk", "Larsen", "Morales", "Kowalski",
        "Weber", "Ali", "Dubois", "Nguyen", "Schmidt", "Costa", "Jensen", "Moreau", "Fischer", "Bianchi"]
JOBS = ["nurse", "teacher", "baker", "pilot", "carpenter", "architect", "chemist", "librarian", "plumber", "dentist",
        "journalist", "electrician", "lawyer", "farmer", "photographer", "translator", "mechanic", "pharmacist",
        "gardener", "accountant", "firefighter", "painter", "surgeon", "barista"]
CITIES = ["Lisbon", "Osaka", "Nairobi", "Toronto", "Berlin", "Lima", "Oslo", "Madrid", "Cairo", "Dublin", "Seoul",
          "Austin", "Porto", "Krakow", "Mumbai", "Quito", "Leeds", "Perth", "Hanoi", "Zurich", "Accra", "Denver",
          "Lyon", "Tbilisi"]

# Each template mentions all four fields in a different order and phrasing.
TEMPLATES = [
    "{name} is a {age}-year-old {job} who lives in {city}.",
    "At {age}, {name} works as a {job} in {city}.",
    "{city}-based {job} {name} ({age}) spoke to us yesterday.",
    "Meet {name}, {age}, a {job} from {city}.",
    "The {job} {name} moved to {city} when she turned {age}.",
    "{name}, a {job} aged {age}, has an office in {city}.",
    "In {city}, {age}-year-old {name} has been a {job} for years.",
    "Our new neighbour is {name}: {age} years old, {job}, from {city}.",
    "{name} ({job}, {age}) was born and raised in {city}.",
    "Last week a {job} named {name}, who is {age}, visited {city}.",
    "Age {age}. Job: {job}. Home town: {city}. Name: {name}.",
    "Having lived in {city} all his life, {name} became a {job} at {age}.",
]

INSTRUCTION = ('Extract the person\'s name, age, job and city from the sentence. Answer with JSON only, '
               'exactly like {"name": "...", "age": 0, "job": "...", "city": "..."}.\nSentence: ')


def make_record(rng: random.Random) -> dict:
    """One example: a chat with the instruction + sentence and the JSON answer (compact, fixed key order)."""
    fields = {"name": f"{rng.choice(FIRST)} {rng.choice(LAST)}", "age": rng.randint(19, 79),
              "job": rng.choice(JOBS), "city": rng.choice(CITIES)}
    sentence = rng.choice(TEMPLATES).format(**fields)
    return {"messages": [{"role": "user", "content": INSTRUCTION + sentence},
                         {"role": "assistant", "content": json.dumps(fields)}]}


def generate(n_train: int, n_heldout: int, seed: int) -> tuple[list[dict], list[dict]]:
    """Return ``(train, heldout)`` with no sentence shared between them (and none repeated)."""
    rng = random.Random(seed)
    seen: set[str] = set()
    records: list[dict] = []
    while len(records) < n_train + n_heldout:
        rec = make_record(rng)
        key = rec["messages"][0]["content"]
        if key not in seen:
            seen.add(key)
            records.append(rec)
    return records[:n_train], records[n_train:]


def main() -> None:
    """CLI: write ``train.jsonl`` and ``heldout.jsonl``."""
    here = Path(__file__).resolve().parent
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n-train", type=int, default=400)
    ap.add_argument("--n-heldout", type=int, default=100)
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--out-dir", type=Path, default=here)
    args = ap.parse_args()
    train, heldout = generate(args.n_train, args.n_heldout, args.seed)
    for name, rows in (("train.jsonl", train), ("heldout.jsonl", heldout)):
        with open(args.out_dir / name, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
        print(f"wrote {len(rows)} examples to {args.out_dir / name}")


if __name__ == "__main__":
    main()
