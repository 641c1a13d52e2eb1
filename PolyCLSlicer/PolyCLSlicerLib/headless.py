"""Stand-ins for the app-only base classes under ``slicer-core`` (no Qt, no ScriptedLoadableModule):
with them the module file imports and its Logic runs headless (batch, console scripts, CI)."""

from __future__ import annotations

import logging
import unittest
from typing import Any


class ScriptedLoadableModule:
    def __init__(self, parent: Any) -> None:
        self.parent = parent


class ScriptedLoadableModuleWidget:
    def __init__(self, parent: Any = None) -> None:
        self.parent = parent


class ScriptedLoadableModuleLogic:
    def __init__(self) -> None:
        pass


class ScriptedLoadableModuleTest(unittest.TestCase):
    def delayDisplay(self, message: str, msec: int = 0) -> None:
        logging.info(message)


class VTKObservationMixin:
    def __init__(self) -> None:
        pass


class WithinRange:
    def __init__(self, minimum: float, maximum: float) -> None:
        self.minimum, self.maximum = minimum, maximum


def parameterNodeWrapper(cls: type) -> type:
    return cls
