"""Non-GUI helpers of the PolyCLSlicer module (importable under slicer-core, without the Slicer app).

- ``mrml``: volume / segmentation nodes <-> ``[i, j, k]`` arrays + IJK->RAS, terminology, .seg.nrrd I/O.
- ``tasks``: a Task = a job of the compute worker + main-thread ``apply``; progress, cancel, polling.
- ``worker_client``: starts and talks to the worker process (``polycl.worker``) and ends its whole process tree.
- ``worker_main``: the worker's start script (run, never imported): the bundled ``polycl`` first on ``sys.path``.
- ``dependencies``: versioned package checks, one-consent installation (main thread), minimum Slicer.
- ``undo``: create-then-rollback of the Logic's ``apply`` steps.
- ``sample_data``, ``selftest``: the Sample Data entry and the module's self-test steps.
- ``gui_connectors``: (app only) a ``str`` file parameter in a ``ctkPathLineEdit``.
- ``segmentation_tasks``, ``loop_tasks``: the Logic's task builders and their synchronous forms (segment /
  refine / propagate; finetune / finetuneSliceChoice / suggestSlice).
- ``scene_helpers``: the Logic's job-less helpers (liver segment lookup, training pairs, review rows, file I/O).
- ``panel_jobs``: (app only, no Qt import) the Widget's one running job: Cancel / Stop button, polling, results.
- ``parameters``, ``report``, ``headless``: panel enums and path helpers, SegmentReport, slicer-core stand-ins.
- ``core``: what the Slicer side reads from checkpoints without torch (model card, starter path).
"""
