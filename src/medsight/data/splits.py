"""Patient-level stratified splits and leakage checks.

No patient may appear in two splits, and no identical image may either: both would inflate test
metrics. Messages never show raw patient ids, only the first 8 hex characters of their sha256.
"""

from __future__ import annotations

import hashlib
import random
from collections import Counter, defaultdict
from typing import Iterable

import numpy as np

from medsight.errors import DataError

SPLITS3 = ("train", "val", "test")


def hashed_id(value: object) -> str:
    """An obfuscated id for messages: the first 8 hex characters of the value's sha256."""
    return hashlib.sha256(str(value).encode("utf-8")).hexdigest()[:8]


def _label_key(label) -> str:
    if label is None:
        return "<none>"
    if isinstance(label, (list, tuple)):
        return ",".join(str(v) for v in label)
    return str(label)


def _group_key(i: int, rec: dict) -> str:
    pid = rec.get("patient_id")
    return f"p:{pid}" if pid not in (None, "") else f"r:{rec.get('path', i)}"


def patient_split(
    records: list[dict],
    fractions: Iterable[float] = (0.7, 0.15, 0.15),
    seed: int = 0,
    stratify: bool = True,
) -> list[dict]:
    """Return copies of ``records`` with ``split`` set to train/val/test (or train/val for two fractions).

    Records sharing a ``patient_id`` always land in the same split; records without one are their
    own group. With ``stratify`` groups are assigned per (majority) label so every split keeps the
    class balance. Deterministic for a given ``seed``.
    """
    fr = [float(f) for f in fractions]
    if len(fr) not in (2, 3) or any(f < 0 for f in fr) or abs(sum(fr) - 1.0) > 1e-6:
        raise DataError(f"invalid split fractions {tuple(fractions)}; expected 2 or 3 non-negative numbers summing to 1")
    names = SPLITS3[: len(fr)]
    if not records:
        raise DataError("cannot split an empty list of records")
    groups: dict[str, list[int]] = defaultdict(list)
    for i, rec in enumerate(records):
        groups[_group_key(i, rec)].append(i)
    # group -> stratum (majority label of its records)
    strata: dict[str, list[str]] = defaultdict(list)
    for g, idx in groups.items():
        key = Counter(_label_key(records[i].get("label")) for i in idx).most_common(1)[0][0] if stratify else "all"
        strata[key].append(g)
    rng = random.Random(seed)
    bounds = np.cumsum(fr)
    assign: dict[str, str] = {}
    for key in sorted(strata):
        gs = sorted(strata[key])
        rng.shuffle(gs)
        total = sum(len(groups[g]) for g in gs)
        done = 0
        for g in gs:
            n = len(groups[g])
            mid = (done + n / 2.0) / total
            k = int(np.searchsorted(bounds, mid, side="right"))
            assign[g] = names[min(k, len(names) - 1)]
            done += n
    out = []
    for i, rec in enumerate(records):
        r = dict(rec)
        r["split"] = assign[_group_key(i, rec)]
        out.append(r)
    return out


def image_hash(array: np.ndarray) -> str:
    """sha256 of an array's shape, dtype and bytes (exact-duplicate detection)."""
    a = np.ascontiguousarray(array)
    h = hashlib.sha256(f"{a.shape}{a.dtype}".encode())
    h.update(a.tobytes())
    return h.hexdigest()


def check_leakage(records: list[dict], images=None, *, allow: bool = False, hashes=None) -> dict:
    """Raise :class:`DataError` when splits share patient ids or identical images; else return a summary.

    ``images`` (optional) is an array or list aligned with ``records`` (or ``hashes``: their :func:`image_hash`
    values, e.g. from the dataset cache); identical pixel bytes in two
    different splits count as leakage. With ``allow`` (``data.allow_leakage`` / ``qc --allow-leakage``) a finding
    is accepted, not raised: the summary's ``findings`` then holds its counts (``patients_in_several_splits``,
    ``identical_images_across_splits``) and ``message`` the sentence the error would have been; counts only.
    """
    pid_splits: dict[str, set] = defaultdict(set)
    for rec in records:
        pid = rec.get("patient_id")
        if pid not in (None, "") and rec.get("split"):
            pid_splits[str(pid)].add(rec["split"])
    leaked = sorted(hashed_id(p) for p, s in pid_splits.items() if len(s) > 1)
    problems = []
    if leaked:
        shown = ", ".join(leaked[:5]) + (f" and {len(leaked) - 5} more" if len(leaked) > 5 else "")
        problems.append(f"{len(leaked)} patient(s) appear in more than one split (sha256 prefixes: {shown})")
    dup_pairs = []
    if images is not None or hashes is not None:
        digests = hashes if hashes is not None else (image_hash(np.asarray(img)) for img in images)
        count = len(hashes) if hashes is not None else len(images)
        if count != len(records):
            raise DataError(f"check_leakage: {count} images for {len(records)} records")
        seen: dict[str, tuple[int, str]] = {}
        for i, (rec, h) in enumerate(zip(records, digests)):
            split = rec.get("split")
            if h in seen and seen[h][1] != split and split is not None and seen[h][1] is not None:
                dup_pairs.append((seen[h][0], i, seen[h][1], split, h[:8]))
            elif h not in seen:
                seen[h] = (i, split)
        if dup_pairs:
            shown = ", ".join(f"#{a} ({sa}) = #{b} ({sb}) [{h}]" for a, b, sa, sb, h in dup_pairs[:5])
            more = f" and {len(dup_pairs) - 5} more" if len(dup_pairs) > 5 else ""
            problems.append(f"{len(dup_pairs)} identical image(s) in different splits: {shown}{more}")
    summary = {"ok": not problems, "patients": len(pid_splits),
               "images_checked": 0 if images is None and hashes is None else len(records), "findings": {}}
    if problems:
        message = "data leakage between splits: " + "; ".join(problems)
        if not allow:
            raise DataError(message + " (to proceed and record it: data.allow_leakage=true, or qc --allow-leakage)")
        summary["findings"] = {"patients_in_several_splits": len(leaked),
                               "identical_images_across_splits": len(dup_pairs)}
        summary["accepted"] = True
        summary["message"] = (f"leakage accepted (data.allow_leakage): {len(leaked)} patient(s) in more than one "
                              f"split, {len(dup_pairs)} identical image(s) in different splits")
    return summary
