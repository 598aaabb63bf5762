"""The study report, a pure function of ``results.json``: nothing here loads adapters, tensors or models.

- `tables`: markdown tables and ``results.csv`` (accuracies with bootstrap intervals, paired Δ).
- `figures`: PNG figures, the conflict heatmap among them (from the conflict scores the fuse stages stored).
- `document`: ``report.md`` put together and written with the figures; `read_results` for ``edgefuse report``.
- `console`: the summary a command prints when a study ends.
"""

from edgefuse.report.document import read_results, write_report
from edgefuse.report.tables import headline_table

__all__ = ["headline_table", "read_results", "write_report"]
