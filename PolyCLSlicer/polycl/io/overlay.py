"""A quick visual check of a liver mask: three axial slices and one coronal, liver outlined, in one PNG.

Slices are chosen and drawn in the canonical patient orientation of ``polycl.geometry`` (from the
direction matrix, never the array axis order): axial slices in the radiological view (anterior up,
patient left on the image right), the coronal slice with superior up; each panel's aspect ratio comes
from the voxel spacing.  The CT is shown in the soft-tissue window (W400/L40) of
``polycl.preprocessing.window``.  matplotlib (Agg, no display) is imported only when drawing.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..geometry import CanonicalOrientation, voxel_spacing
from .base import atomic_write

AXIAL_FRACTIONS = (0.25, 0.5, 0.75)  # positions within the liver's superior-inferior extent
MIN_CORONAL_EXTENT = 0.2  # a coronal panel needs a superior-inferior extent of this share of its width
OUTLINE_COLOR = "#ff5a1f"


@dataclass
class Panel:
    """One displayed slice: image rows top->bottom, columns left->right, as a radiologist sees them."""

    title: str
    ct: np.ndarray  # windowed to [0, 1]
    mask: np.ndarray
    aspect: float  # height / width of one pixel (row spacing / column spacing)
    edges: tuple[str, str, str, str]  # patient direction at the top, bottom, left, right of the image


def _axial_indices(liver_slices: np.ndarray, count: int) -> list[int]:
    """Canonical axial indices at AXIAL_FRACTIONS of the liver's extent (of the volume if no liver)."""
    if liver_slices.size:
        first, last = int(liver_slices.min()), int(liver_slices.max())
    else:
        first, last = 0, count - 1
    indices = [int(round(first + fraction * (last - first))) for fraction in AXIAL_FRACTIONS]
    return sorted(set(indices))  # a liver on one or two slices: each slice once


def overlay_panels(ct: np.ndarray, mask: np.ndarray, ijk_to_ras: np.ndarray) -> list[Panel]:
    """Up to three axial panels (inferior to superior, each slice once) and one coronal panel through the
    liver's centre, left out when the volume is too thin for one (a few slices)."""
    from ..preprocessing import window

    orientation = CanonicalOrientation.from_matrix(ijk_to_ras)
    hu = orientation.to_canonical(np.asarray(ct))  # (inferior->superior, anterior->posterior, right->left)
    liver = orientation.to_canonical(np.asarray(mask) > 0)
    s_mm, p_mm, l_mm = voxel_spacing(ijk_to_ras)[list(orientation.permutation)]
    panels = []
    for index in _axial_indices(np.flatnonzero(liver.any(axis=(1, 2))), hu.shape[0]):
        panels.append(Panel(f"axial {index + 1}/{hu.shape[0]}", window(hu[index]), liver[index],
                            p_mm / l_mm, ("A", "P", "R", "L")))
    if hu.shape[0] * s_mm < MIN_CORONAL_EXTENT * hu.shape[2] * l_mm:
        return panels  # a few slices: a coronal view would be an unreadable strip
    rows = np.flatnonzero(liver.any(axis=(0, 2)))
    row = int(round(rows.mean())) if rows.size else hu.shape[1] // 2
    panels.append(Panel(f"coronal {row + 1}/{hu.shape[1]}", window(hu[::-1, row, :]), liver[::-1, row, :],
                        s_mm / l_mm, ("S", "I", "R", "L")))
    return panels


def draw_overlay(panels: list[Panel], caption: str):
    """A matplotlib Figure (Agg canvas, no pyplot state) with the panels side by side."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(4 * len(panels), 4.6), dpi=100, facecolor="black")
    FigureCanvasAgg(figure)
    for number, panel in enumerate(panels, 1):
        axes = figure.add_subplot(1, len(panels), number)
        axes.imshow(panel.ct, cmap="gray", vmin=0.0, vmax=1.0, aspect=panel.aspect, interpolation="nearest")
        if panel.mask.any():
            axes.contour(panel.mask.astype(np.uint8), levels=[0.5], colors=OUTLINE_COLOR, linewidths=1.2)
        axes.set_title(panel.title, color="white", fontsize=10)
        axes.set_axis_off()
        top, bottom, left, right = panel.edges
        for text, x, y in ((top, 0.5, 0.98), (bottom, 0.5, 0.02), (left, 0.02, 0.5), (right, 0.98, 0.5)):
            axes.text(x, y, text, color="yellow", fontsize=9, ha="center", va="center", transform=axes.transAxes)
    figure.text(0.5, 0.03, caption, color="white", ha="center", fontsize=12)
    figure.subplots_adjust(left=0.01, right=0.99, top=0.92, bottom=0.1, wspace=0.04)
    return figure


def write_overlay(path: str | os.PathLike, ct: np.ndarray, mask: np.ndarray, ijk_to_ras: np.ndarray,
                  caption: str) -> Path:
    """Write the overlay PNG atomically."""
    figure = draw_overlay(overlay_panels(ct, mask, ijk_to_ras), caption)
    return atomic_write(path, lambda temp: figure.savefig(temp, format="png", facecolor="black"), suffix=".png")


def liver_caption(name: str, mask: np.ndarray, ijk_to_ras: np.ndarray) -> str:
    """'<name>: liver 1234.5 mL (W400/L40; liver outlined)', or says no liver was found."""
    voxels = int(np.count_nonzero(mask))
    if not voxels:
        return f"{name}: no liver found (W400/L40)"
    millilitres = voxels * float(np.prod(voxel_spacing(ijk_to_ras))) / 1000
    return f"{name}: liver {millilitres:.1f} mL (W400/L40; liver outlined)"
