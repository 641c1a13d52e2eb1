"""The ``polycl`` command line: ``main`` (parser, segment / evaluate / info / sample), one module per
subcommand group (``finetune``, ``outputs``, ``pretrain``, ``sam``, ``suggest``) and ``common`` (help format,
the one-line user error, path checks, strict JSON, progress bars) below all of them."""

from .main import build_parser, main  # the function, not the module: `from polycl.cli import main`

__all__ = ["build_parser", "main"]
