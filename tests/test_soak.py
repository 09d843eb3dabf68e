import pytest

from benchmarks.soak import soak


@pytest.mark.slow
def test_long_run_shows_no_memory_growth_or_handle_leak():
    records = soak(epochs_each=15)  # 105 epochs, checkpoints every epoch
    assert len(records) == 105
    warm = records[len(records) // 4:]  # after allocator warm-up
    rss = [r["rss_mb"] for r in warm]
    assert max(rss) - min(rss) < 40, rss
    second_half = warm[len(warm) // 2:]
    assert max(r["rss_mb"] for r in second_half) <= max(r["rss_mb"] for r in warm[: len(warm) // 2]) + 10
    assert len({r["fds"] for r in records}) == 1, [r["fds"] for r in records]
