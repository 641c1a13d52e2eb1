"""Human in the loop (paint a few slices -> finetune -> suggest the next slice), Slicer side, without torch.

The rules live in ``polycl.training.sparse`` (numpy only); the model runs in the worker (task ``suggest``).
Slice numbers are array indices ``k`` along the volume's axial axis (what the slice views show).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from polycl.training.sparse import is_sparse_annotation

FINETUNE_SLICE_MODES = ("auto", "annotated", "all")


@dataclass
class SliceChoice:
    """Which slices a finetune trains on, and why (shown in the panel)."""

    mode: str  # "annotated" or "all"
    slices: dict[str, list[int]]  # volume name -> its painted slices (array indices)
    reason: str
    trainingSlices: int  # slices the loss sees (all slices of every volume in "all" mode)

    def summary(self) -> str:
        label = "Annotated slices" if self.mode == "annotated" else "Whole volume"
        return f"{label}: training on {self.trainingSlices} slices ({self.reason})."


@dataclass
class SuggestReport:
    """Suggested slices (best first) with their scores and the RAS centre of each slice."""

    slices: list[int]
    scores: list[float]
    positions: list[tuple[float, float, float]]
    axis: int
    annotated: list[int] = field(default_factory=list)
    liverExtent: list[int] | None = None

    def summary(self) -> str:
        if not self.slices:
            return ("No slice to suggest: the model finds no liver outside the slices already painted"
                    if self.annotated else "No slice to suggest: the model finds no liver in this volume")
        ranked = ", ".join(f"{k} ({s:.2f})" for k, s in zip(self.slices, self.scores, strict=True))
        return f"Paint slice {self.slices[0]} next (least reliable first: {ranked})."


def choose_slice_mode(painted: dict[str, list[int]], extents: dict[str, list[int] | None],
                      slice_counts: dict[str, int], mode: str = "auto") -> SliceChoice:
    """``auto``: annotated slices when any volume's liver segment is sparse (gaps, or < half of the model's
    liver extent), else the whole volume; ``annotated`` / ``all`` are taken as given."""
    if mode not in FINETUNE_SLICE_MODES:
        raise ValueError(f"unknown slice mode {mode!r}; use one of {', '.join(FINETUNE_SLICE_MODES)}")
    reasons = {name: is_sparse_annotation(slices, extents.get(name)) for name, slices in painted.items()}
    if mode == "auto":
        sparse = [name for name, (is_sparse, _) in reasons.items() if is_sparse]
        mode = "annotated" if sparse else "all"
        reason = "; ".join(f"{name}: {reasons[name][1]}" for name in (sparse or list(reasons)))
    else:
        reason = "chosen in the panel"
    count = (sum(len(s) for s in painted.values()) if mode == "annotated" else sum(slice_counts.values()))
    return SliceChoice(mode, painted, reason, count)
