"""SAM-family refinement and propagation: model wrappers (``models``), their builders and checkpoint checks
(``builders``), per-slice box refinement (``refine``), the propagation trackers (``engines``: SAM 2 video
predictor, LiteMedSAM box chaining) and one-slice propagation with its stop rules (``propagation``).

To add a refiner: a ``Refiner`` subclass in ``models`` and its builder in ``builders.build_refiner``.
"""

from ..exports import lazy_exports

EXPORTS = {
    **dict.fromkeys(("REFINERS", "build_refiner", "build_litemedsam", "build_sam", "shared_refiner"), "builders"),
    **dict.fromkeys(("Refiner", "SamRefiner", "Sam2ImageRefiner", "EmbeddingCache"), "models"),
    **dict.fromkeys(("refine_volume", "RefinementResult"), "refine"),
    **dict.fromkeys(("propagate_from_annotation", "StopRules"), "propagation"),
}
__all__ = sorted(EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, EXPORTS)
