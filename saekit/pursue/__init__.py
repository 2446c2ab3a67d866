"""Stage 3, pursue: sparse codes for a whole cache by pursuit, compared with the SAE's encoder.

stage.py   PursueConfig, run: the rows, the codes store, one pass measuring every encoding
report.py  Entry, PursueResult, the table, report.json / report.md and the plot
"""

from saekit.codes import open_codes
from saekit.pursue.report import Entry, PursueResult, entry_dict, format_table, write_report
from saekit.pursue.stage import PursueConfig, compared_rows, run

__all__ = [
    "Entry",
    "PursueConfig",
    "PursueResult",
    "compared_rows",
    "entry_dict",
    "format_table",
    "open_codes",
    "run",
    "write_report",
]
