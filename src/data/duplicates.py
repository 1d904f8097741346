"""Leakage and copies: exact duplicates (same bytes) and near-duplicates (resized, re-encoded copies).

Near-duplicates are found by the preflight's signature of each decoded image: pHash bits (structure) and
an 8x8 colour thumbnail must both be close; the audit, which embeds every image, also pairs images by the
cosine of centred backbone features. Measured (docs/data.md): a copy of a hymenoptera photo resized to
50-70 % and re-encoded at JPEG quality 40-60 is within 2 bits and 2.4/255 of its source, no two distinct
photos within 14 bits; the synthetic shapes set has 108 pairs of distinct images within 8 bits (the same
shape at the same place in another colour), all more than 11/255 apart in colour.
"""

from __future__ import annotations

import json
import logging
import os
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from src.data.preflight import signature_arrays
from src.utils.errors import UserError
from src.utils.io import atomic_write, json_digest

log = logging.getLogger(__name__)

CHUNK = 1024  # rows compared at once: bounds memory at CHUNK x N bytes
CANDIDATES = 65536  # hash-close pairs whose colours are compared at once (x 192 floats x 4 bytes: 50 MB)


@dataclass(frozen=True)
class Pair:
    """Two files that are the same image: ``kind`` exact (same bytes) or near; ``similarity`` 1.0 for exact,
    else 1 - differing pHash bits / 64, or the centred cosine for pairs found by features."""

    kind: str
    similarity: float
    split_a: str
    path_a: str
    split_b: str
    path_b: str

    def row(self) -> tuple[str, float, str, str, str, str]:
        return (self.kind, round(self.similarity, 4), self.split_a, self.path_a, self.split_b, self.path_b)


COLUMNS = ["kind", "similarity", "split_a", "path_a", "split_b", "path_b"]
SPLIT_ORDER = {"train": 0, "val": 1, "test": 2}


@dataclass(frozen=True)
class NearRule:
    """When two signatures are copies: pHash within ``max_hash_distance`` bits (None: exact copies only) and
    8x8 thumbnails within ``max_colour_difference`` (mean absolute, of 255; None: colour not compared)."""

    max_hash_distance: int | None = 8
    max_colour_difference: float | None = 8.0


def find_duplicates(
    files: dict[str, list[str]],
    digests: dict[str, str],
    signatures: dict[str, str],
    rule: NearRule,
    within: bool = False,
) -> list[Pair]:
    """Exact and near-duplicate pairs between different splits (and inside each one with ``within``).

    A pair lists the earlier split (train before val before test) first. Exact pairs first, then by
    similarity.
    """
    items = [(s, p) for s in sorted(files, key=lambda s: SPLIT_ORDER.get(s, 9)) for p in files[s]]
    pairs = exact_pairs(items, digests, within)
    if rule.max_hash_distance is not None:
        exact = {(p.path_a, p.path_b) for p in pairs}
        pairs += [q for q in near_pairs(items, signatures, rule, within) if (q.path_a, q.path_b) not in exact]
    return sorted(pairs, key=lambda q: (q.kind != "exact", -q.similarity, q.path_a, q.path_b))


def cached_duplicates(
    files: dict[str, list[str]],
    digests: dict[str, str],
    signatures: dict[str, str],
    rule: NearRule,
    cache_dir: str | os.PathLike | None,
) -> list[Pair]:
    """``find_duplicates`` across splits, kept in ``cache_dir`` under a key of everything it reads (each file's
    split, path, SHA-256 and signature, and the rule): an unchanged dataset skips the search, which on a
    100,000-image look-alike set costs a minute or more; any change (a file, a split, the rule) searches again."""
    if cache_dir is None:
        return find_duplicates(files, digests, signatures, rule)
    listed = [[s, p, digests.get(p), signatures.get(p)] for s in sorted(files) for p in files[s]]
    path = Path(cache_dir) / f"duplicates-{json_digest([asdict(rule), listed])[:32]}.json"
    try:
        return [Pair(*row) for row in json.loads(path.read_text(encoding="utf-8", errors="surrogateescape"))]
    except (OSError, ValueError, TypeError):
        pass  # none yet, or unreadable: search
    pairs = find_duplicates(files, digests, signatures, rule)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, lambda f: json.dump([list(q.row()) for q in pairs], f))
    except (OSError, UserError) as err:  # costs a search next time, no more
        log.warning("Duplicate search not cached (%s); the next run searches again", err)
    return pairs


def exact_pairs(items: list[tuple[str, str]], digests: dict[str, str], within: bool) -> list[Pair]:
    by_digest: dict[str, list[tuple[str, str]]] = defaultdict(list)
    for split, path in items:
        if path in digests:
            by_digest[digests[path]].append((split, path))
    pairs = []
    for group in by_digest.values():
        for i, (sa, pa) in enumerate(group):
            for sb, pb in group[i + 1 :]:
                if within or sa != sb:
                    pairs.append(Pair("exact", 1.0, sa, pa, sb, pb))
    return pairs


def near_pairs(items: list[tuple[str, str]], signatures: dict[str, str], rule: NearRule, within: bool) -> list[Pair]:
    """Pairs whose signatures are close by ``rule``. ``items`` come in split order (train, val, test): without
    ``within``, each block of rows is compared only with the columns from the next split on, so a 80/20 split
    costs a fifth of all pairs; a pair's distance is one 64-bit XOR and popcount (10,000 images: ~0.1 s)."""
    hashed = [(s, p) for s, p in items if p in signatures]
    if len(hashed) < 2:
        return []
    matrix, thumbs = signature_arrays([signatures[p] for _, p in hashed])
    hashes = np.ascontiguousarray(matrix).view(np.uint64).ravel()  # the 8 pHash bytes as one word
    splits = np.array([SPLIT_ORDER.get(s, 9) for s, _ in hashed])
    if not within and np.any(np.diff(splits) < 0):
        raise ValueError("near_pairs: items must come in split order")
    pairs = []
    for start in range(0, len(hashed), CHUNK):
        block = hashes[start : start + CHUNK]
        # columns that can pair with this block: later rows, or (across splits) rows of a later split
        first = start if within else int(np.searchsorted(splits, splits[start], side="right"))
        dist = np.bitwise_count(block[:, None] ^ hashes[None, first:])
        rows, cols = np.nonzero(dist <= rule.max_hash_distance)
        i, j, bits = rows + start, cols + first, dist[rows, cols]
        keep = (j > i) if within else (j > i) & (splits[i] != splits[j])
        i, j, bits = i[keep], j[keep], bits[keep]
        if rule.max_colour_difference is not None:  # vectorised: look-alike sets give millions of candidates
            close = np.empty(len(i), dtype=bool)
            for b in range(0, len(i), CANDIDATES):
                part = slice(b, b + CANDIDATES)
                close[part] = np.abs(thumbs[i[part]] - thumbs[j[part]]).mean(axis=1) <= rule.max_colour_difference
            i, j, bits = i[close], j[close], bits[close]
        for a, b, d in zip(i.tolist(), j.tolist(), bits.tolist(), strict=True):
            (sa, pa), (sb, pb) = hashed[a], hashed[b]
            pairs.append(Pair("near", 1 - int(d) / 64, sa, pa, sb, pb))
    return pairs


def feature_pairs(
    items: list[tuple[str, str]], features: torch.Tensor, min_cosine: float, within: bool, skip: set[tuple[str, str]]
) -> list[Pair]:
    """Near pairs by the cosine of features centred on their mean (the shared component inflates raw
    cosines); ``skip``: (path_a, path_b) pairs already found."""
    x = features.float()
    x = torch.nn.functional.normalize(x - x.mean(0, keepdim=True), dim=1)
    splits = torch.tensor([SPLIT_ORDER.get(s, 9) for s, _ in items])
    pairs = []
    for start in range(0, len(items), CHUNK):
        sim = x[start : start + CHUNK] @ x.T
        rows, cols = torch.nonzero(sim >= min_cosine, as_tuple=True)
        for r, c in zip(rows.tolist(), cols.tolist(), strict=True):
            i = start + r
            if c <= i or (not within and splits[i] == splits[c]):
                continue
            (sa, pa), (sb, pb) = items[i], items[c]
            if (pa, pb) not in skip and (pb, pa) not in skip:
                pairs.append(Pair("near", float(sim[r, c]), sa, pa, sb, pb))
    return pairs
