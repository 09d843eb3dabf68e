"""``md.benchmark``: the comparison every paper needs, under an equal budget.

Methods × datasets × seeds; every (method, dataset, seed) *cell* is trained with the same epochs,
optimizer, batch size and encoders (built after seeding with the cell's seed), selected on the
validation split, and evaluated once on the test split. Finished cells are cached atomically
(``out/cells``), so a re-run computes only what is missing. Paired t-tests against joint training
with Holm's correction, an HTML leaderboard and CSV; optional fair tuning (Optuna, the same
trial budget per method, validation only); cells in local processes (``jobs=N``) or on Ray.
See docs/benchmark.md.
"""

from .cells import CellTask, DataSource, run_cell
from .leaderboard import render_leaderboard
from .result import BenchmarkResult
from .runner import benchmark, resolve_data, resolve_methods
from .stats import PairedTest, holm, paired_test
from .tuning import LR_SPACE, SEARCH_SPACES, search_space

__all__ = ["benchmark", "BenchmarkResult", "SEARCH_SPACES", "LR_SPACE", "search_space",
           "paired_test", "holm", "PairedTest", "CellTask", "DataSource", "run_cell",
           "render_leaderboard", "resolve_data", "resolve_methods"]
