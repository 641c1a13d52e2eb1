"""The client side of a batch: submit the cases that still miss an output, follow them with a progress bar
(done / failed / left, time left), and keep ``summary.csv`` (one row per case) up to date.

A re-run of the same command does only what is left: a case whose outputs all exist is skipped (its row is
carried over from the previous ``summary.csv``).  Ctrl-C cancels the running cases; what was written stays.
"""

from __future__ import annotations

import contextlib
import csv
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import astuple, dataclass
from pathlib import Path
from typing import Any

from .cases import ATTEMPTS_FOLDER, Case, attempts_file, remove_stale_temporaries
from .cluster import ClusterOptions, describe, open_client
from .work import RESOURCE, CaseResult, Settings, count_attempts, run_case

SUMMARY_NAME = "summary.csv"
SAVE_EVERY_SECONDS = 10.0


@dataclass
class Row:
    """One line of ``summary.csv``."""

    input: str
    output: str
    status: str  # ok, no liver, FAILED, skipped (outputs exist), not run (interrupted)
    liver_ml: str = ""
    warnings: str = ""
    seconds: str = ""
    worker: str = ""
    attempts: str = ""


HEADER = tuple(Row.__dataclass_fields__)


@dataclass
class BatchReport:
    rows: list[Row]
    summary: Path
    interrupted: bool = False

    def count(self, status: str) -> int:
        return sum(row.status == status for row in self.rows)

    @property
    def retried(self) -> int:
        return sum(row.attempts not in ("", "1") for row in self.rows if row.status != "skipped")

    @property
    def exit_code(self) -> int:
        """0 done, 1 any case failed (Scripts/batch.py's rules), 130 interrupted."""
        return 130 if self.interrupted else (1 if self.count("FAILED") else 0)

    def line(self) -> str:
        processed = self.count("ok") + self.count("no liver")
        retried = f", {self.retried} retried after a worker died" if self.retried else ""
        return (f"{processed} of {len(self.rows)} processed, {self.count('skipped')} skipped (outputs exist), "
                f"{self.count('FAILED')} failed, {self.count('no liver')} with no liver found (empty masks)"
                f"{retried}; outputs in {self.summary.parent}, table in {self.summary.name}")


def result_row(case: Case, result: CaseResult) -> Row:
    notes = result.warnings if result.status != "FAILED" else [result.message, *result.warnings]
    return Row(str(case.input), "; ".join(Path(p).name for p in result.written), result.status,
               "" if result.liver_ml is None else f"{result.liver_ml:.1f}", "; ".join(notes),
               f"{result.seconds:.1f}", result.worker, str(result.attempts))


def died_row(case: Case, error: BaseException) -> Row:
    """A case whose worker died on every attempt (Dask's KilledWorker) or that the cluster lost."""
    attempts = count_attempts(case)
    reason = (f"the worker died on each of {attempts} attempts (killed, or out of memory: a larger CT than "
              "the workers' memory?)" if type(error).__name__ == "KilledWorker" else
              (str(error).strip().splitlines() or [type(error).__name__])[-1])
    return Row(str(case.input), "", "FAILED", warnings=reason, attempts=str(attempts))


def read_summary(path: Path) -> dict[str, Row]:
    """The previous run's rows by input (empty when there is none or it is not ours)."""
    try:
        with open(path, newline="", encoding="utf-8") as handle:
            rows = list(csv.reader(handle))
    except OSError:
        return {}
    if not rows or tuple(rows[0]) != HEADER:
        return {}
    return {row[0]: Row(*row) for row in rows[1:] if len(row) == len(HEADER)}


def skipped_row(case: Case, previous: dict[str, Row]) -> Row:
    earlier = previous.get(str(case.input))
    names = "; ".join(p.name for p in case.outputs)
    if earlier is None:
        return Row(str(case.input), names, "skipped", warnings="outputs exist (--overwrite replaces them)")
    return Row(earlier.input, names, "skipped", earlier.liver_ml, earlier.warnings, earlier.seconds,
               earlier.worker, earlier.attempts)


def write_summary(path: Path, rows: Sequence[Row]) -> Path:
    """``summary.csv`` written atomically (a reader never sees half of it)."""
    from ..io.base import atomic_write

    def write(temp: Path) -> None:
        with open(temp, "w", newline="", encoding="utf-8") as handle:
            csv.writer(handle).writerows([HEADER, *(astuple(row) for row in rows)])

    return atomic_write(path, write, suffix=".csv")


class Progress:
    """A tqdm bar over the submitted cases: done / failed / left and the time left (stderr)."""

    def __init__(self, total: int, where: str, enabled: bool = True) -> None:
        from tqdm import tqdm

        self.done = self.failed = 0
        self.bar = tqdm(total=total, desc=f"batch ({where})", unit="case", file=sys.stderr, smoothing=0,
                        disable=not enabled, dynamic_ncols=True)
        self.update()

    def update(self, failed: bool | None = None) -> None:
        if failed is not None:
            self.failed += failed
            self.done += not failed
        left = self.bar.total - self.done - self.failed
        self.bar.set_postfix_str(f"done {self.done}, failed {self.failed}, left {left}", refresh=failed is None)
        if failed is not None:
            self.bar.update(1)

    def close(self) -> None:
        self.bar.close()


def run_batch(cases: Sequence[Case], settings: Settings, options: ClusterOptions, output_dir: Path,
              progress: bool = True, on_row: Callable[[Row], None] | None = None) -> BatchReport:
    """Run every pending case on Dask workers and write ``summary.csv``; the report of every case."""
    output_dir.mkdir(parents=True, exist_ok=True)
    summary = output_dir / SUMMARY_NAME
    previous = read_summary(summary)
    rows: dict[int, Row] = {i: skipped_row(case, previous) for i, case in enumerate(cases) if not case.pending}
    pending = {i: case for i, case in enumerate(cases) if case.pending}
    for case in pending.values():
        attempts_file(case).unlink(missing_ok=True)  # a new run counts its own attempts
        remove_stale_temporaries(case)
    report = BatchReport([], summary)
    try:
        if pending:
            run_pending(pending, settings, options, rows, summary, progress, on_row)
    except KeyboardInterrupt:
        report.interrupted = True
    finally:
        for i, case in enumerate(cases):
            rows.setdefault(i, Row(str(case.input), "", "not run",
                                   warnings="the batch stopped before this case finished"))
        report.rows = [rows[i] for i in range(len(cases))]
        write_summary(summary, report.rows)
        with contextlib.suppress(OSError):  # the attempt records' folder, once no case is in flight
            (output_dir / ATTEMPTS_FOLDER).rmdir()
    return report


def run_pending(pending: dict[int, Case], settings: Settings, options: ClusterOptions, rows: dict[int, Row],
                summary: Path, progress: bool, on_row: Callable[[Row], None] | None) -> None:
    from distributed import as_completed

    with open_client(options) as client:
        restrictions = {"resources": {RESOURCE: 1}} if one_case_per_worker(client, options) else {}
        futures = {client.submit(run_case, case, settings, key=f"polycl-case-{i}-{case.stem}", pure=False,
                                 **restrictions): i for i, case in pending.items()}
        bar = Progress(len(futures), describe(client) if not options.system else options.system, progress)
        saved = time.monotonic()
        try:
            for future in as_completed(futures):
                i = futures[future]
                rows[i] = finished_row(pending[i], future)
                bar.update(failed=rows[i].status == "FAILED")
                if on_row:
                    on_row(rows[i])
                if time.monotonic() - saved > SAVE_EVERY_SECONDS:
                    write_summary(summary, [rows[k] for k in sorted(rows)])
                    saved = time.monotonic()
        except KeyboardInterrupt:
            client.cancel(list(futures))
            raise
        finally:
            bar.close()


def finished_row(case: Case, future: Any) -> Row:
    try:
        result = future.result()
    except Exception as error:  # noqa: BLE001  (KilledWorker, a lost scheduler: this case failed, not the batch)
        row = died_row(case, error)
    else:
        row = result_row(case, result)
    attempts_file(case).unlink(missing_ok=True)
    return row


def one_case_per_worker(client: Any, options: ClusterOptions) -> bool:
    """Whether tasks ask for the ``polycl`` resource: always on clusters this module starts; on a given
    scheduler only when its workers declare it (``dask worker --resources polycl=1``), else a worker runs
    as many cases at once as it has threads, one torch thread each."""
    if not options.scheduler:
        return True
    workers = client.scheduler_info().get("workers", {}).values()
    return any(RESOURCE in info.get("resources", {}) for info in workers)


def format_table(rows: Sequence[tuple[str, ...]], header: tuple[str, ...]) -> str:
    widths = [max(len(str(r[c])) for r in [header, *rows]) for c in range(len(header))]
    lines = ["  ".join(str(v).ljust(w) for v, w in zip(row, widths, strict=True)).rstrip()
             for row in [header, tuple("-" * w for w in widths), *rows]]
    return "\n".join(lines)


def table(report: BatchReport) -> str:
    """The printed table: input name, status, mL, seconds, attempts, outputs / reason."""
    rows = [(Path(r.input).name, r.status, r.liver_ml, r.seconds, r.attempts,
             "; ".join(part for part in (r.output, r.warnings) if part)) for r in report.rows]
    return format_table(rows, ("input", "status", "liver ml", "seconds", "attempts", "output / reason"))
