"""Sample data for demos and tests: a small structured task the base model cannot do
(short invoice texts -> a fixed JSON shape)."""

from __future__ import annotations

import json
import random
from pathlib import Path

VENDORS = ["Acme Corp", "Globex", "Initech", "Umbrella Ltd", "Stark Industries", "Wayne Supplies", "Hooli",
           "Vandelay Imports", "Soylent Foods", "Tyrell Systems"]
CURRENCIES = ["EUR", "USD", "GBP", "CHF"]
TEMPLATES = [
    "Invoice {num} from {vendor}, total {total} {cur}.",
    "{vendor} billed us {total} {cur} on invoice {num}.",
    "Please pay {total} {cur} to {vendor} (invoice {num}).",
]


def invoice_records(n: int, seed: int = 0) -> list[dict[str, str]]:
    rng = random.Random(seed)
    records = []
    for _ in range(n):
        num = f"INV-{rng.randint(1000, 9999)}"
        vendor = rng.choice(VENDORS)
        total = f"{rng.randint(10, 999)}.{rng.randint(0, 99):02d}"
        cur = rng.choice(CURRENCIES)
        text = rng.choice(TEMPLATES).format(num=num, vendor=vendor, total=total, cur=cur)
        answer = json.dumps({"invoice": num, "vendor": vendor, "total": total, "currency": cur})
        records.append({"prompt": f"Extract the invoice as JSON.\n{text}\nJSON: ", "completion": answer})
    return records


def invoice_preference_records(n: int, seed: int = 0) -> list[dict[str, str]]:
    """Preference pairs on the invoice task: the complete, correct JSON is chosen over a shorter one
    with the wrong vendor. A base model's likelihood favours the shorter answer, so a base scores
    low on preference accuracy and DPO has something to learn."""
    rng = random.Random(seed + 1)
    pairs = []
    for record in invoice_records(n, seed):
        answer = json.loads(record["completion"])
        wrong = rng.choice([v for v in VENDORS if v != answer["vendor"]])
        pairs.append({"prompt": record["prompt"], "chosen": record["completion"],
                      "rejected": json.dumps({"invoice": answer["invoice"], "vendor": wrong})})
    return pairs


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path
