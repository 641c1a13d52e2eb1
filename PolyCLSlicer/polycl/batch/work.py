"""What a Dask worker does for one case: read the CT from shared storage, segment it with the model this worker
keeps warm, write the missing outputs atomically, and return one :class:`CaseResult` (never an array).

:class:`WarmModels` is the worker plugin that holds the models and sets the worker's torch threads to the cores
Dask gave it; :func:`run_case` is the task.  A broken input is a ``FAILED`` result, not an exception, so the
client gets the message, the seconds and the worker; only a worker that dies (killed, out of memory) makes the
scheduler retry the case elsewhere (``distributed.scheduler.allowed-failures``).
"""

from __future__ import annotations

import os
import socket
import sys
import time
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from distributed import WorkerPlugin

from ..heap import release_free_memory
from ..pipeline import ModelCache
from ..threads import configure_threads
from .cases import Case, attempts_file

PLUGIN_NAME = "polycl-warm-models"
RESOURCE = "polycl"  # a worker declaring polycl=1 runs one case at a time with all its threads in torch


@dataclass(frozen=True)
class Settings:
    """The ``polycl segment`` options a batch passes to every case."""

    checkpoint: str | None = None
    device: str = "auto"
    batch_size: int | None = None
    allow_non_ct: bool = False
    refine: str = "none"
    sam_checkpoint: str | None = None
    sam_model: str | None = None
    sam2_checkpoint: str | None = None
    sam2_config: str | None = None
    refine_margin: int = 2
    refine_min_iou: float = 0.5
    refine_precision: str = "auto"

    @property
    def refiner_checkpoint(self) -> str | None:
        """``--sam2-checkpoint`` for sam2 when given, else ``--sam-checkpoint`` (as ``polycl segment``)."""
        return self.sam2_checkpoint if self.refine == "sam2" and self.sam2_checkpoint else self.sam_checkpoint


@dataclass
class CaseResult:
    """One row of ``summary.csv``: status is ``ok``, ``no liver`` or ``FAILED`` (then ``message`` says why)."""

    status: str
    seconds: float
    worker: str
    liver_ml: float | None = None
    warnings: list[str] = field(default_factory=list)
    written: list[str] = field(default_factory=list)
    message: str = ""
    attempts: int = 1


class WarmModels(WorkerPlugin):
    """Dask worker plugin: the segmentation network (and refiner) loaded once per worker process and kept."""

    name = PLUGIN_NAME

    def __init__(self) -> None:  # sent to the workers pickled: the models are made there
        self._fill(f"{socket.gethostname()}:{os.getpid()}")

    def _fill(self, label: str) -> None:
        self.models = ModelCache()
        self.refiners: dict[tuple, Any] = {}
        self.label = label

    def __getstate__(self) -> dict:
        return {}

    def __setstate__(self, state: dict) -> None:
        self._fill(f"{socket.gethostname()}:{os.getpid()}")

    def setup(self, worker: Any) -> None:
        """Torch threads = the cores Dask gave this worker when it runs one case at a time (``polycl``
        resource), else one per task thread; ``POLYCL_THREADS`` overrides both."""
        one_case = RESOURCE in worker.state.total_resources
        configure_threads(None if os.environ.get("POLYCL_THREADS") else
                          (worker.state.nthreads if one_case else 1))
        self.label = f"{worker.name}@{socket.gethostname()}:{os.getpid()}"

    def teardown(self, worker: Any) -> None:
        self.models.clear()
        self.refiners.clear()

    def refiner(self, settings: Settings) -> Any:
        from ..sam.refine import build_refiner

        key = (settings.refine, settings.refiner_checkpoint, settings.sam_model, settings.sam2_config,
               settings.device, settings.refine_precision)
        if key not in self.refiners:
            self.refiners[key] = build_refiner(settings.refine, checkpoint=settings.refiner_checkpoint,
                                               model_type=settings.sam_model, config=settings.sam2_config,
                                               device=settings.device, precision=settings.refine_precision,
                                               cache_bytes=0)
        return self.refiners[key]


def worker_models() -> WarmModels:
    """This Dask worker's plugin (registered by the client), or a process-wide one outside Dask."""
    global _local_models
    from distributed import get_worker

    try:
        return get_worker().plugins[PLUGIN_NAME]
    except (ValueError, KeyError):
        _local_models = _local_models or WarmModels()
        return _local_models


_local_models: WarmModels | None = None


def record_attempt(case: Case, label: str) -> int:
    """Append this start to the case's attempt record on shared storage; the number of starts so far."""
    record = attempts_file(case)
    record.parent.mkdir(parents=True, exist_ok=True)
    with open(record, "a", encoding="utf-8") as handle:
        handle.write(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} {label}\n")
    return count_attempts(case)


def count_attempts(case: Case) -> int:
    try:
        return len(attempts_file(case).read_text(encoding="utf-8").splitlines())
    except OSError:
        return 0


def run_case(case: Case, settings: Settings) -> CaseResult:
    """The Dask task: segment one case and write its missing outputs; a failure is a FAILED result."""
    warm = worker_models()
    started = time.perf_counter()
    attempts = record_attempt(case, warm.label)
    try:
        result = segment_case(case, settings, warm)
    except Exception as error:  # noqa: BLE001  (one bad input must not stop the batch)
        message = (str(error).strip().splitlines() or [type(error).__name__])[-1].strip("'")
        result = CaseResult("FAILED", 0.0, warm.label, message=message)
    release_free_memory()  # the next case starts from what the models hold, not from this case's peak
    result.seconds = round(time.perf_counter() - started, 2)
    result.attempts = attempts
    result.worker = f"{warm.label} ({torch_threads()} threads)"
    return result


def torch_threads() -> int:
    """The intra-op threads torch computes with in this process (0 when torch was never loaded)."""
    return sys.modules["torch"].get_num_threads() if "torch" in sys.modules else 0


def segment_case(case: Case, settings: Settings, warm: WarmModels) -> CaseResult:
    """``polycl segment``'s rules on one case: the same checks, model, liver check, refinement and writers."""
    from ..io.volumes import read_volume
    from ..preprocessing import check_ct

    volume = read_volume(case.input)
    notes = check_ct(volume.array, str(case.input), settings.allow_non_ct)
    segmenter = warm.models.segmenter(settings.checkpoint, settings.device)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # every note is in result.warnings
        result = segmenter.segment(volume.array, volume.ijk_to_ras, batch_size=settings.batch_size,
                                   input_notes=notes)
    notes = result.warnings
    mask = result.mask
    refiner = None
    if settings.refine != "none" and mask.any():
        from ..sam.refine import refine_volume

        refiner = warm.refiner(settings)
        mask = refine_volume(volume.array, volume.ijk_to_ras, mask, refiner, margin=settings.refine_margin,
                             min_iou=settings.refine_min_iou or None).mask
    written, writer_notes = write_case(case, volume, mask, segmenter.card, settings, refiner)
    found = result.liver is None or result.liver.found
    liver_ml = float(np.count_nonzero(mask)) * float(np.prod(volume.spacing)) / 1000
    return CaseResult("ok" if found else "no liver", 0.0, warm.label, round(liver_ml, 1), notes + writer_notes,
                      written)


def write_case(case: Case, volume: Any, mask: np.ndarray, card: dict, settings: Settings,
               refiner: Any) -> tuple[list[str], list[str]]:
    """The case's missing outputs, through the writers ``polycl segment`` uses."""
    from ..io.dicom import choose_series
    from ..io.outputs import wants_dicom_seg, write_liver_outputs
    from ..nets.model_card import algorithm_identity

    targets = [t for t in case.targets if t in case.missing]
    dicom_source = None
    if any(wants_dicom_seg(t) for t in targets):
        if not case.input.is_dir():
            raise ValueError(f"{case.input} is a file: a DICOM SEG output needs a DICOM series folder as input")
        dicom_source = choose_series(case.input).files
    algorithm, version = algorithm_identity(card, settings.checkpoint, None if refiner is None else refiner.name)
    overlay = case.overlay if case.overlay in case.missing else None
    return write_liver_outputs(targets, volume, mask, algorithm=algorithm, version=version,
                               dicom_source=dicom_source, overlay=overlay, name=case.input.name)
