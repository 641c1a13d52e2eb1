"""parameterNodeWrapper connector for a ``str`` parameter shown in a ``ctkPathLineEdit`` (app only).

Slicer (5.10, ``parameterNodeWrapper/guiConnectors.py``) binds a ctkPathLineEdit only to ``pathlib.Path``,
whose empty value ``Path()`` is ``'.'``: the panel showed '.' as if a file were chosen.  PolyCL's file
parameters are strings whose empty value is ``''`` (no file).  Importing this module registers the
connector (``parameterNodeGuiConnector``, the documented extension point).
"""

from __future__ import annotations

import ctk
from slicer.parameterNodeWrapper import GuiConnector, parameterNodeGuiConnector, unannotatedType


@parameterNodeGuiConnector
class PathLineEditToStrConnector(GuiConnector):
    """``str`` <-> ``ctkPathLineEdit.currentPath``; ``''`` is an empty line edit."""

    @staticmethod
    def canRepresent(widget, datatype) -> bool:
        return type(widget) is ctk.ctkPathLineEdit and unannotatedType(datatype) is str

    @staticmethod
    def create(widget, datatype):
        if PathLineEditToStrConnector.canRepresent(widget, datatype):
            return PathLineEditToStrConnector(widget)
        return None

    def __init__(self, widget) -> None:
        super().__init__()
        self._widget = widget

    def _connect(self) -> None:
        self._widget.currentPathChanged.connect(self.changed)

    def _disconnect(self) -> None:
        self._widget.currentPathChanged.disconnect(self.changed)

    def widget(self):
        return self._widget

    def read(self) -> str:
        return self._widget.currentPath

    def write(self, value: str) -> None:
        if value != self._widget.currentPath:  # rewriting the same text would move the cursor
            self._widget.currentPath = value
