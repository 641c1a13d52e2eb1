"""PolyCL core: Slicer-free liver segmentation in CT (arrays + IJK->RAS matrices in, arrays out).

Modules, one per concern: io, preprocessing, models, checkpoints, training, finetuning, inference,
metrics, samples, cli (pretraining, sam_refine, sam2_propagation build on them).
"""

__version__ = "0.1.0"
