"""Exports of reverie models to other runtimes: ``onnx`` (``export_onnx``; run by ``reverie.onnx_runtime``)."""

from .onnx import ExportReport, export_onnx

__all__ = ["ExportReport", "export_onnx"]
