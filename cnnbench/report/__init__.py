"""Render a suite's markdown report from MLflow alone (no torch): query → DataFrame → tables + PNGs.

Which runs belong to a report: for each (variant, seed) of the suite as it is now, the newest
run with the same plan key — so editing a variant retires its old runs from the report. When the
suite searches, the runs of its current studies' best values are preferred; untuned runs
(``--no-search``) are shown when there are none, and the table says which.

Modules: ``selection`` (which runs, per-seed values, comparisons), ``tables``, ``prose`` (the
answer and section texts), ``plots`` and ``build`` (the report file and the index). Formats,
labels and directions of metrics come from :mod:`cnnbench.metrics`. Nothing here imports torch.
"""

from cnnbench.report.build import META_PREFIX, build_report, report_files, report_meta, write_index

__all__ = ["META_PREFIX", "build_report", "report_files", "report_meta", "write_index"]
