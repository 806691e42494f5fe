#!/usr/bin/env python3
"""Writes tests/fixtures/minilm_reference.json: sentence-transformers' own all-MiniLM-L6-v2
vectors and token ids for real ESCI product titles, rendered product texts and queries, the
reference our burn encoder must match (cosine >= 0.999, identical token ids).

The fixture names its texts by product id / query id and the SHA-256 of the exact text, never
the text itself: the ESCI rows stay out of the repository, and the test reads them from the
shared data directory (skipping when it is absent).

Run once, by hand, when the fixture needs regenerating (it is committed; CI never runs this):

    python3 -m venv /tmp/st && /tmp/st/bin/pip install sentence-transformers
    /tmp/st/bin/python scripts/reference/minilm_reference.py \
        --model-dir models/all-MiniLM-L6-v2 --esci-dir ../shared/data/esci-graded

Vectors are stored as base64 little-endian float16 (their rounding moves a cosine by < 1e-6),
so the fixture stays small.
"""
import argparse
import base64
import csv
import hashlib
import html
import json
import re
from pathlib import Path

import numpy as np
from sentence_transformers import SentenceTransformer

TAG = re.compile(r"<[A-Za-z/!][^>]*>")


def clean(text: str, max_chars: int = 1000) -> str:
    text = TAG.sub(" ", html.unescape(text))
    text = " ".join(text.split())
    return text[:max_chars].rstrip()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model-dir", required=True)
    parser.add_argument("--esci-dir", required=True)
    parser.add_argument("--output", default="tests/fixtures/minilm_reference.json")
    arguments = parser.parse_args()
    esci = Path(arguments.esci_dir)
    products = [json.loads(line) for line in (esci / "products.jsonl").open(encoding="utf-8")]
    with (esci / "judgments_test.csv").open(encoding="utf-8") as handle:
        query_ids = dict(sorted({(row["query"], row["query_id"]) for row in csv.DictReader(handle)}))
    queries = sorted(query_ids)
    title_products = products[:: len(products) // 12][:12]
    titles = [product["title"] for product in title_products]
    described = [product for product in products if product["description"]][7::97][:4]
    rendered = [f"title: {clean(p['title'])} description: {clean(p['description'])}" for p in described]
    chosen_queries = queries[:: max(1, len(queries) // 12)][:12]
    chosen_queries_ids = [query_ids[query] for query in chosen_queries]
    texts = titles + rendered + chosen_queries

    model = SentenceTransformer(arguments.model_dir, device="cpu")
    vectors = model.encode(texts, batch_size=8, normalize_embeddings=False, convert_to_numpy=True)
    max_length = model.max_seq_length
    token_ids = [
        model.tokenizer(text, truncation=True, max_length=max_length)["input_ids"] for text in texts
    ]
    weights = Path(arguments.model_dir) / "model.safetensors"
    kinds = ["title"] * len(titles) + ["product_text"] * len(rendered) + ["query"] * len(chosen_queries)
    sources = [p["product_id"] for p in title_products] + [p["product_id"] for p in described] + chosen_queries_ids
    fixture = {
        "model": "sentence-transformers/all-MiniLM-L6-v2",
        "model_safetensors_sha256": hashlib.sha256(weights.read_bytes()).hexdigest(),
        "max_seq_length": max_length,
        "produced_by": "scripts/reference/minilm_reference.py (sentence-transformers, CPU, float32)",
        "source": "ESCI (Amazon Shopping Queries, Apache-2.0): shared/data/esci-graded products.jsonl and judgments_test.csv",
        "texts": [
            {
                "kind": kind,
                "id": source,
                "text_sha256": hashlib.sha256(text.encode("utf-8")).hexdigest(),
                "token_ids": ids,
                "vector_f16_base64": base64.b64encode(np.asarray(vector, dtype="<f2").tobytes()).decode(),
            }
            for kind, source, text, ids, vector in zip(kinds, sources, texts, token_ids, vectors)
        ],
    }
    Path(arguments.output).write_text(json.dumps(fixture, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    print(f"wrote {len(texts)} reference vectors to {arguments.output}")


if __name__ == "__main__":
    main()
