"""Shared by every ``polycl`` subcommand: help formatting, the one-line user error, path checks,
strict JSON and the progress bar."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np

EXIT_ERROR = 2



class CliError(Exception):
    """A user error reported as one line with a non-zero exit code."""



class ArgumentParser(argparse.ArgumentParser):
    """A usage error is one line saying what is wrong and where the help is, not the whole usage text."""

    def error(self, message: str):  # noqa: D401  (argparse's hook)
        self.exit(EXIT_ERROR, f"{self.prog}: error: {message} (see: {self.prog} --help)\n")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Shows each option's default (unless its help states it; unset options: "none") and keeps the
    examples' line breaks."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text or action.default is False or not action.option_strings \
                or action.default == argparse.SUPPRESS:
            return text
        return text + (" (default: none)" if action.default is None else " (default: %(default)s)")



PROGRESS_FORMAT = "{desc}: {percentage:3.0f}%|{bar}| {elapsed}<{remaining}{postfix}"  # postfix brings its ", "


def tqdm_progress(description: str) -> tuple[Callable[[float, str], None], Callable[[], None]]:
    """A progress(fraction, message) callback drawing a tqdm bar with elapsed and remaining time, and its closer.

    The bar advances through ``update`` (not by setting its position), so tqdm's rate and time left follow the
    work done; smoothing 0 estimates from the whole run, steadier than the last steps' rate."""
    from tqdm import tqdm

    bar = tqdm(total=100, desc=description, unit="%", leave=False, file=sys.stderr, smoothing=0,
               bar_format=PROGRESS_FORMAT)

    def update(fraction: float, message: str) -> None:
        done = int(round(100 * min(max(float(fraction), 0.0), 1.0)))
        if done > bar.n:
            bar.update(done - bar.n)
        bar.set_postfix_str(message, refresh=True)

    return update, bar.close



def _check_output(path: Path, overwrite: bool) -> None:
    if path.exists() and not overwrite:
        raise CliError(f"{path} exists; pass --overwrite to replace it")



def check_output_path(raw: str | os.PathLike, overwrite: bool, suffixes: tuple[str, ...],
                      inputs: tuple = ()) -> Path:
    """An output file name checked before any work: extension, not one of ``inputs``, existing file,
    existing folder that takes a new file (probed, so it holds for root and read-only mounts too)."""
    from ..io.base import check_output_file

    path = Path(raw)
    if not path.name.lower().endswith(suffixes):
        raise CliError(f"{path}: unsupported output extension; use one of {', '.join(suffixes)}")
    if path.is_dir():
        raise CliError(f"{path} is a folder; give a file name")
    check_output_file(path, inputs)
    _check_output(path, overwrite)
    return path



def check_input_path(raw: str | os.PathLike | None, option: str) -> None:
    """A file (or DICOM folder) named by an option must exist before any work starts."""
    if raw is not None and not Path(raw).exists():
        raise CliError(f"{option} {raw}: no such file or folder")



def _finite(value: object) -> object:
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(item) for item in value]
    if isinstance(value, (float, np.floating)):
        return float(value) if np.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    return value



def strict_json(value: object) -> str:
    """Strict JSON (RFC 8259): an infinite or NaN number (e.g. HD with exactly one mask empty) becomes null."""
    return json.dumps(_finite(value), indent=2, allow_nan=False)
