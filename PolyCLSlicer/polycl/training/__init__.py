"""Training: supervised finetuning with Dice loss (``finetuning``, its ``config`` and training ``slices``), the
epoch ``loop`` shared with pretraining, sparse (painted-slice) finetuning (``sparse``, ``sparse_training``) and
self-supervised ``pretraining`` (PolyCL-S/-O/-M, SimCLR, Pix2Rep).
"""

from ..exports import lazy_exports

EXPORTS = {
    "FinetuneConfig": "config",
    **dict.fromkeys(("FinetuneResult", "finetune", "split_scans", "soft_dice_loss", "resolve_config"), "finetuning"),
    **dict.fromkeys(("SliceSet", "slices_from_pairs"), "slices"),
    **dict.fromkeys(("annotated_slices", "select_slices", "is_sparse_annotation", "SLICE_MODES"), "sparse"),
    **dict.fromkeys(("PretrainConfig", "pretrain", "build_slice_index"), "pretraining"),
}
__all__ = sorted(EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, EXPORTS)
