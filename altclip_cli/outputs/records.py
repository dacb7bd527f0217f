"""The records altclip writes for each classified image and each search result, shared by the
command line's writers (cli/) and the server's answers (serve/): one shape on every path.

  {"image": name, "scores": [{"label", "prob", "logit"}, ...]}   a scored image
  {"image": name, "top": label or None, "scores": [...]}         with its best label (with_top)
  {"image": name, "error": reason}                               an image that failed
  {"rank": 1, "path": path, "score": 0.3127, "taken": "2023-07-14T10:20:30+02:00",
   "gps": [lat, lon], "camera": "Canon EOS R5"}                  a search result (search_record;
                                                                 taken, gps, camera when known)
"""
from __future__ import annotations

from typing import Sequence

UNSURE = "(unsure)"  # how a table marks an image below --min-prob


def number(x) -> float:
    """A float32 as a short JSON number (6 significant digits)."""
    return float(f"{float(x):.6g}")


def score_record(image: str, labels: Sequence[str], probs, logits, top_k: int | None) -> dict:
    """{"image": ..., "scores": [{"label", "prob", "logit"}, ...]} sorted by prob, descending;
    equal probabilities keep the labels' order. Repeated labels stay separate entries."""
    order = sorted(range(len(labels)), key=lambda j: -float(probs[j]))
    if top_k is not None:
        order = order[:top_k]
    return {"image": image,
            "scores": [{"label": labels[j], "prob": number(probs[j]), "logit": number(logits[j])} for j in order]}


def with_top(record: dict, min_prob: float | None = None) -> dict:
    """The record with "top" after "image": its best label, or None (unsure) when the best
    probability is below min_prob. Error records are returned as they are."""
    if "error" in record:
        return record
    best = record["scores"][0] if record["scores"] else None
    top = best["label"] if best and (min_prob is None or best["prob"] >= min_prob) else None
    return {"image": record["image"], "top": top, **{k: v for k, v in record.items() if k not in ("image", "top")}}


def error_record(image: str, error: str) -> dict:
    return {"image": image, "error": error}


def search_record(rank: int, path: str, score: float, facts: dict | None = None) -> dict:
    """A search result: its rank (1 is the best), path, cosine score (4 decimals), and what is
    known of "taken", "gps" and "camera" (facts: search.facts.PhotoFacts.record())."""
    return {"rank": rank, "path": path, "score": round(score, 4), **(facts or {})}
