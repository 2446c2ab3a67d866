"""The latent dashboard: one streaming pass for each latent's statistics and top contexts, then
static pages.

    stage.py  DashboardConfig, run, the statistics
    html.py   the pages
"""

from saekit.dashboard.stage import (
    DashboardConfig,
    DashboardResult,
    latent_pages,
    run,
    stream_stats,
)

__all__ = [
    "DashboardConfig",
    "DashboardResult",
    "latent_pages",
    "run",
    "stream_stats",
]
