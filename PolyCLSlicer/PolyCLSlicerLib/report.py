"""What a Logic segment / refine / propagate call did to the scene."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class SegmentReport:
    """What Logic.segment / Logic.propagate did to the scene."""

    segmentationNode: Any
    segmentId: str
    segmentName: str
    voxelCount: int
    volumeMl: float
    seconds: float
    slices: list[int] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    review: list[dict] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    liver: dict | None = None  # the worker's liver check (polycl.presence): status found / none / implausible

    @property
    def liverFound(self) -> bool:
        return self.liver is None or self.liver.get("status") != "none"

    def summary(self) -> str:
        if not self.liverFound:
            return (f"No liver found: {self.liver.get('reason', '')}. '{self.segmentName}' is empty "
                    f"({self.seconds:.1f} s)." + "".join(f"\nWarning: {w}" for w in self.warnings
                                                          if not w.startswith("no liver found")))
        text = f"'{self.segmentName}': {self.volumeMl:.1f} ml on {len(self.slices)} slices ({self.seconds:.1f} s)"
        if self.review:
            text += f"; {len(self.review)} slices to review"
        return text + "".join(f"\n{n}" for n in self.notes) + "".join(f"\nWarning: {w}" for w in self.warnings)
