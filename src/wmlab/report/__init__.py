"""The report of a run: ``report.md`` and a self-contained ``report.html``.

``write_report(run_dir)`` reads whatever the run directory holds (its config, the episode
store, V's, M's and C's metrics and pictures, the evaluation JSONs) and writes one page
with a section per stage. A stage that has not run yet is named in its section instead of
failing the report, so a report can be written at any point of a run. The plots go to
``<run>/report/`` as PNGs; the HTML page carries every picture inline (base64), so it can
be mailed or archived as one file.

Several runs (the iterations of ``<run>/iterations/<k>/``, or runs passed as ``compare``)
are reported side by side in the evaluation table and in a plot of C's scored means.

The modules, from the bottom up: ``reading`` (the run directory), ``plots`` (the figures),
``document`` (the block types, rendered to Markdown and HTML), ``page`` (what the sections
share), ``model_sections`` (data, V, M) and ``result_sections`` (summary, config, pipeline,
C, evaluation), ``write`` (the entry point). The published numbers are in
``wmlab.published``.
"""

from wmlab.report.write import ReportPaths, write_report

__all__ = ["ReportPaths", "write_report"]
