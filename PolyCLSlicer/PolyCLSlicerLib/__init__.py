"""Non-GUI helpers of the PolyCLSlicer module (importable under slicer-core, without the Slicer app).

- ``mrml``: volume / segmentation nodes <-> ``[i, j, k]`` arrays + IJK->RAS, terminology, .seg.nrrd I/O.
- ``tasks``: compute-off-thread / apply-on-main-thread tasks with progress and cancel.
- ``dependencies``: first-use Python package checks and installation (main thread only).
- ``core``: the one place that calls the Slicer-free ``polycl`` engine.
"""
