"""Batch segmentation of many CTs on Dask (a LocalCluster, a given scheduler, or SLURM / PBS / LSF / SGE through
dask-jobqueue): ``polycl batch`` and ``Scripts/batch.py`` share it.

Modules: ``cases`` (inputs, output names, what is missing), ``work`` (the task a worker runs, the warm-model
plugin), ``cluster`` (where the workers come from), ``runner`` (submit, progress, ``summary.csv``).
Dask is imported only when a batch runs.
"""

from ..exports import lazy_exports

EXPORTS = {
    **dict.fromkeys(("Case", "FORMATS", "find_inputs", "plan_cases", "output_name"), "cases"),
    **dict.fromkeys(("Settings", "CaseResult", "WarmModels", "run_case"), "work"),
    **dict.fromkeys(("ClusterOptions", "open_client", "jobqueue_cluster", "local_size"), "cluster"),
    **dict.fromkeys(("run_batch", "BatchReport", "Row", "table"), "runner"),
}
__all__ = sorted(EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, EXPORTS)
