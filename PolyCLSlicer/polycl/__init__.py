"""PolyCL core: Slicer-free liver segmentation in CT (arrays + IJK->RAS matrices in, arrays out).

Subpackages by concern: ``io`` (files in and out), ``nets`` (networks, checkpoints), ``training``
(finetuning, pretraining), ``sam`` (SAM refinement and propagation), ``cli``; the layers and what each owns:
docs/ARCHITECTURE.md.
"""

__version__ = "0.1.0"
