"""Is there a liver in view?  The model's largest component judged by what the model and anatomy say.

A segmentation network always labels *something* most like liver, also on a CT that holds none (pelvis,
neck, a left-side crop): a small blob in a muscle or the spleen.  ``assess_liver`` decides from

* the model's confidence: the mean probability inside the component;
* anatomy: the liver is a right-sided organ (the component's centre lies on the patient's right of the body's
  midline, not at the body's lateral edge) and a liver in view is never a few millilitres;
* extent: when the component ends inside the scan at both ends (the whole craniocaudal extent in view),
  its volume must be that of a whole liver;

and returns ``none`` (the mask is emptied: *no liver found*), ``implausible`` (kept, flagged) or ``found``,
with one sentence saying why.  The thresholds are measured in ``bench/liver_presence.py``
(docs/liver_presence.md).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .geometry import CanonicalOrientation, voxel_spacing

FOUND, NONE, IMPLAUSIBLE = "found", "none", "implausible"
MIN_LIVER_ML = 10.0  # a liver in view covers more: one 5 mm slice of its thinnest tip is ~10 mL
SMALL_ML = 150.0  # below this a component must also be confident and placed like a liver
MIN_CONFIDENCE = 0.9  # mean probability inside a small component
MAX_LATERAL = 0.75  # centre of a small component: at most this share of the body's half-width right of midline
WHOLE_LIVER_ML = (500.0, 4000.0)  # adult livers, with margin; checked when both ends of the mask are in view
NOT_A_WHOLE_LIVER_ML = 150.0  # whole extent in view but less than this: no adult liver (newborns' are ~150 mL)
MAX_LIVER_ML = 4000.0
BODY_HU = -300.0
# body on more than half of the scan's left or right edge: the field of view cuts through the body (measured:
# whole CTs 0-0.37, arms and hips touching the edge; 150-250 mm fields of view 0.57-1.0 on at least one side)
CUT_BODY_SHARE = 0.5


@dataclass
class LiverCheck:
    """What the mask says about the liver: ``status`` found / none / implausible, the reason, and its figures."""

    status: str
    reason: str
    volume_ml: float = 0.0
    confidence: float = 0.0
    lateral: float | None = None  # centre right of the body's midline in body half-widths (<0: left; None: cut)
    whole_extent: bool = False  # neither the first nor the last axial slice holds mask

    @property
    def found(self) -> bool:
        return self.status != NONE

    @property
    def message(self) -> str:
        """The line users see (empty when the liver looks as expected)."""
        if self.status == NONE:
            return f"no liver found: {self.reason}"
        if self.status == IMPLAUSIBLE:
            return f"implausible liver: {self.reason}; check the mask"
        return ""

    def as_dict(self) -> dict:
        return {"status": self.status, "reason": self.reason, "volume_ml": round(self.volume_ml, 1),
                "confidence": round(self.confidence, 3),
                "lateral": None if self.lateral is None else round(self.lateral, 2),
                "whole_extent": self.whole_extent}


def _mean_index(counts: np.ndarray) -> float:
    return float((np.arange(len(counts)) * counts).sum() / max(counts.sum(), 1))


def axial_extent(mask: np.ndarray, ijk_to_ras: np.ndarray) -> tuple[int, int, int]:
    """(axial array axis, first, last slice holding mask) of a non-empty mask."""
    axis = CanonicalOrientation.from_matrix(ijk_to_ras).slice_axis
    rows = np.flatnonzero(np.any(mask, axis=tuple(a for a in range(3) if a != axis)))
    return axis, int(rows[0]), int(rows[-1])


def lateral_position(mask: np.ndarray, ct: np.ndarray, ijk_to_ras: np.ndarray,
                     extent: tuple[int, int, int] | None = None) -> float | None:
    """Centre of ``mask`` to the patient's right of the body's midline on the mask's axial slices, in body
    half-widths (negative: on the left); None when the scan cuts the body at its left or right side (a small
    field of view), where the midline is not in view.  RAS x grows towards the patient's right.

    From per-axis voxel counts only (x is linear in i, j, k: a centroid's x is exact, the body's 1st-99th
    percentile extent is taken along the array axis closest to left-right): no voxel list is built.
    ``extent``: the mask's ``axial_extent`` when the caller has it."""
    axis, first, last = extent or axial_extent(mask, ijk_to_ras)
    pick = [slice(None)] * 3
    pick[axis] = slice(first, last + 1)
    body = np.asarray(ct[tuple(pick)]) > BODY_HU
    if not body.any():
        return None
    x_of_index = np.asarray(ijk_to_ras, float)[0, :3]  # RAS x = x_of_index @ ijk + origin: differences only
    lateral_axis = int(np.argmax(np.abs(x_of_index)))
    sides = np.moveaxis(body, lateral_axis, 0)  # a view: ndarray.take would copy the whole volume first
    edges = (sides[0], sides[-1])
    if any(edge.mean() > CUT_BODY_SHARE for edge in edges):
        return None
    part = np.asarray(mask)[tuple(pick)] != 0
    profiles = {name: [array.sum(axis=tuple(b for b in range(3) if b != a)) for a in range(3)]
                for name, array in (("body", body), ("mask", part))}
    means = {name: np.array([_mean_index(counts) for counts in profile]) for name, profile in profiles.items()}
    lateral = profiles["body"][lateral_axis]
    cumulative = np.cumsum(lateral) / lateral.sum()
    low, high = (float(np.searchsorted(cumulative, q)) for q in (0.01, 0.99))
    others = x_of_index @ means["body"] - x_of_index[lateral_axis] * means["body"][lateral_axis]
    edge_x = sorted(x_of_index[lateral_axis] * index + others for index in (low, high))
    mask_x = float(x_of_index @ means["mask"])
    return float((mask_x - (edge_x[0] + edge_x[1]) / 2) / max((edge_x[1] - edge_x[0]) / 2, 1.0))


def assess_liver(mask: np.ndarray, confidence: float, ct: np.ndarray, ijk_to_ras: np.ndarray) -> LiverCheck:
    """Judge the (largest-component) liver ``mask`` of ``ct`` ([i, j, k] arrays, IJK->RAS); ``confidence`` is
    the model's mean probability inside the mask."""
    mask = np.asarray(mask) != 0
    volume = float(mask.sum() * np.prod(voxel_spacing(ijk_to_ras)) / 1000.0)
    if volume == 0:
        return LiverCheck(NONE, "the model labelled no voxel as liver")
    extent = axial_extent(mask, ijk_to_ras)
    axis, first, last = extent
    whole = first > 0 and last < mask.shape[axis] - 1
    lateral = lateral_position(mask, ct, ijk_to_ras, extent)
    check = LiverCheck(FOUND, "", volume, float(confidence), lateral, whole)
    if volume < MIN_LIVER_ML:
        return _judged(check, NONE, f"only {volume:.1f} mL were labelled, less than any liver in view")
    if lateral is not None and lateral < 0:
        return _judged(check, NONE, f"the {volume:.0f} mL labelled lie on the patient's left, where the liver is not")
    if volume < SMALL_ML and confidence < MIN_CONFIDENCE:
        return _judged(check, NONE, f"a small region ({volume:.0f} mL) labelled with low confidence "
                                    f"({confidence:.2f})")
    if volume < SMALL_ML and lateral is not None and lateral > MAX_LATERAL:
        return _judged(check, NONE, f"a small region ({volume:.0f} mL) at the body's right edge, not where the "
                                    "liver lies")
    if whole and volume < NOT_A_WHOLE_LIVER_ML:
        return _judged(check, NONE, f"a {volume:.0f} mL region that ends inside the scan at both ends, far less than "
                                    "a whole liver")
    if volume > MAX_LIVER_ML:
        return _judged(check, IMPLAUSIBLE, f"{volume / 1000:.2f} L is more than any liver")
    if whole and not WHOLE_LIVER_ML[0] <= volume <= WHOLE_LIVER_ML[1]:
        return _judged(check, IMPLAUSIBLE, f"the mask ends inside the scan at both ends but holds only "
                                           f"{volume:.0f} mL, less than a whole liver")
    return check


def _judged(check: LiverCheck, status: str, reason: str) -> LiverCheck:
    check.status, check.reason = status, reason
    return check
