"""Example selection for PolyCL (METHOD §2, paper eqs. 1-3): triplets re-drawn every epoch.

Every sampler draws, for each anchor slice s, one positive s+ and one negative s- with a seeded
RNG (``numpy.random.default_rng([seed, epoch])``), so an epoch's triplets are reproducible and
independent of how many epochs ran before (resume gives the same draws).

- PolyCL-S (no labels):      s+ another slice of the same scan;          s- a slice of another scan.
- PolyCL-O (presence T):     s+ another slice with T(s+) = T(s), any scan; s- any slice with T != T(s).
- PolyCL-M (scan + presence): s+ another slice of the same scan with T = T(s);
  s- with T != T(s) from the same scan (``negative_source="paper"``, default) or from another scan
  (``"reference"``, as in the authors' code).

Degenerate cases never loop: each pick is one uniform draw from a precomputed candidate list.
- Fewer than two scans (S), or no slice with / without the organ (O, M): ``SamplerError``.
- An anchor with no possible positive (a one-slice scan; the only slice of its presence class):
  the anchor is dropped for the run (counted in ``TripletDraw.dropped``).
- PolyCL-M, no negative in the preferred source: taken from the other source (same scan <-> other
  scan), counted in ``TripletDraw.fallbacks``; ``strict=True`` raises instead.
Slices of unknown presence (-1) are neither anchors nor candidates for O and M.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .slice_index import SliceIndex

METHODS = ("polycl-s", "polycl-o", "polycl-m", "simclr", "pix2rep")
NEGATIVE_SOURCES = ("paper", "reference")


class SamplerError(ValueError):
    """The slice index cannot provide the examples a method needs."""


@dataclass
class TripletDraw:
    """One epoch's examples: rows of slice indices (anchor, positive, negative) or (slice,)."""

    items: np.ndarray  # int64 (n, 3) for PolyCL, (n, 1) for SimCLR / Pix2Rep
    dropped: int = 0
    fallbacks: int = 0


def _pick(group: np.ndarray, rng: np.random.Generator, exclude: int | None = None) -> int | None:
    """Uniform element of a sorted array, optionally excluding one value; None when impossible."""
    if exclude is not None:
        where = int(np.searchsorted(group, exclude))
        if where < len(group) and group[where] == exclude:
            if len(group) < 2:
                return None
            j = int(rng.integers(len(group) - 1))
            return int(group[j + 1 if j >= where else j])
    if len(group) == 0:
        return None
    return int(group[int(rng.integers(len(group)))])


class SliceSampler:
    """Anchor slices only (SimCLR, Pix2Rep): every anchor once per epoch."""

    method = "slices"

    def __init__(self, index: SliceIndex, anchor_fraction: float | None = 0.3, seed: int = 0):
        self.index = index
        self.seed = int(seed)
        self.anchors = np.sort(index.anchor_indices(anchor_fraction)).astype(np.int64)
        if len(self.anchors) == 0:
            raise SamplerError("no slices to train on")

    def rng(self, epoch: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, int(epoch)])

    def draw(self, epoch: int) -> TripletDraw:
        return TripletDraw(self.anchors[:, None].copy())


class _TripletSampler(SliceSampler):
    """Shared draw loop; subclasses return (positive, negative, used_fallback) or None."""

    def draw(self, epoch: int) -> TripletDraw:
        rng = self.rng(epoch)
        rows, dropped, fallbacks = [], 0, 0
        for anchor in self.anchors:
            picked = self._select(int(anchor), rng)
            if picked is None:
                dropped += 1
                continue
            positive, negative, fallback = picked
            rows.append((int(anchor), positive, negative))
            fallbacks += int(fallback)
        if not rows:
            raise SamplerError(f"{self.method}: no anchor has a valid positive and negative")
        return TripletDraw(np.asarray(rows, np.int64), dropped, fallbacks)

    def _select(self, anchor: int, rng: np.random.Generator) -> tuple[int, int, bool] | None:
        raise NotImplementedError


class PolyCLSSampler(_TripletSampler):
    """PolyCL-S: positive from the same scan, negative from a different scan (eq. 1)."""

    method = "polycl-s"

    def __init__(self, index: SliceIndex, anchor_fraction: float | None = 0.3, seed: int = 0):
        super().__init__(index, anchor_fraction, seed)
        scans = np.unique(index.scan)
        if len(scans) < 2:
            raise SamplerError(f"PolyCL-S needs slices from at least two scans (negatives come from "
                               f"another scan); got {len(scans)} scan(s)")
        everything = np.arange(len(index))
        self.same = {int(s): everything[index.scan == s] for s in scans}
        self.other = {int(s): everything[index.scan != s] for s in scans}

    def _select(self, anchor: int, rng: np.random.Generator) -> tuple[int, int, bool] | None:
        scan = int(self.index.scan[anchor])
        positive = _pick(self.same[scan], rng, exclude=anchor)
        if positive is None:  # one-slice scan
            return None
        return positive, _pick(self.other[scan], rng), False


class _PresenceSampler(_TripletSampler):
    def __init__(self, index: SliceIndex, anchor_fraction: float | None = 0.3, seed: int = 0):
        super().__init__(index, anchor_fraction, seed)
        known = index.presence >= 0
        if not known.any():
            raise SamplerError(f"{self.method} needs slice-level organ presence: give label volumes "
                               "(--labels) or per-slice flag lists")
        with_organ, without = int((index.presence == 1).sum()), int((index.presence == 0).sum())
        if with_organ == 0 or without == 0:
            raise SamplerError(f"{self.method} needs slices both with and without the organ; the data has "
                               f"{with_organ} with and {without} without (slices of unknown presence are "
                               "not used): add scans or flags that cover organ-free slices")
        self.anchors = self.anchors[known[self.anchors]]
        if len(self.anchors) == 0:
            raise SamplerError(f"{self.method}: no anchor slice has a known organ presence")
        everything = np.arange(len(index))
        self.by_presence = {t: everything[index.presence == t] for t in (0, 1)}


class PolyCLOSampler(_PresenceSampler):
    """PolyCL-O: positive with the same presence, negative with the other presence, any scan (eq. 2)."""

    method = "polycl-o"

    def _select(self, anchor: int, rng: np.random.Generator) -> tuple[int, int, bool] | None:
        t = int(self.index.presence[anchor])
        positive = _pick(self.by_presence[t], rng, exclude=anchor)
        if positive is None:
            return None
        return positive, _pick(self.by_presence[1 - t], rng), False


class PolyCLMSampler(_PresenceSampler):
    """PolyCL-M: positive from the same scan with the same presence; negative with the other
    presence from the same scan (paper) or another scan (reference code) (eq. 3)."""

    method = "polycl-m"

    def __init__(self, index: SliceIndex, anchor_fraction: float | None = 0.3, seed: int = 0,
                 negative_source: str = "paper", strict: bool = False):
        super().__init__(index, anchor_fraction, seed)
        if negative_source not in NEGATIVE_SOURCES:
            raise SamplerError(f"negative_source must be one of {NEGATIVE_SOURCES}, got {negative_source!r}")
        self.negative_source = negative_source
        self.strict = strict
        everything = np.arange(len(index))
        self.same: dict[tuple[int, int], np.ndarray] = {}
        self.other: dict[tuple[int, int], np.ndarray] = {}
        for s in np.unique(index.scan):
            for t in (0, 1):
                self.same[(int(s), t)] = everything[(index.scan == s) & (index.presence == t)]
                self.other[(int(s), t)] = everything[(index.scan != s) & (index.presence == t)]

    def _select(self, anchor: int, rng: np.random.Generator) -> tuple[int, int, bool] | None:
        scan, t = int(self.index.scan[anchor]), int(self.index.presence[anchor])
        positive = _pick(self.same[(scan, t)], rng, exclude=anchor)
        if positive is None:
            return None
        sources = [self.same, self.other] if self.negative_source == "paper" else [self.other, self.same]
        negative = _pick(sources[0][(scan, 1 - t)], rng)
        if negative is not None:
            return positive, negative, False
        if self.strict:
            where = "its own scan" if self.negative_source == "paper" else "any other scan"
            raise SamplerError(f"PolyCL-M (strict): anchor slice {anchor} ({self.index.scans[scan].name}) has no "
                               f"slice with different organ presence in {where}")
        negative = _pick(sources[1][(scan, 1 - t)], rng)
        return (positive, negative, True) if negative is not None else None


def make_sampler(method: str, index: SliceIndex, anchor_fraction: float | None = 0.3, seed: int = 0,
                 negative_source: str = "paper", strict: bool = False) -> SliceSampler:
    """The sampler of a pretraining method."""
    if method == "polycl-s":
        return PolyCLSSampler(index, anchor_fraction, seed)
    if method == "polycl-o":
        return PolyCLOSampler(index, anchor_fraction, seed)
    if method == "polycl-m":
        return PolyCLMSampler(index, anchor_fraction, seed, negative_source, strict)
    if method in ("simclr", "pix2rep"):
        return SliceSampler(index, anchor_fraction, seed)
    raise SamplerError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
