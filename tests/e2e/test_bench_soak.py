"""`bench soak` through the real server, short: every request answered and the KV cache within its budget,
with work ahead on and off; off, nothing is worked ahead.  Whether anything is worked ahead with it on
depends on the machine: the prefetch after an answer starts after a 0.1 s pause, and on a loaded machine
(CI) the server's own turnaround between two of the soak's requests can exceed that."""

from hirope_lsp.research.bench import bench_soak


def test_a_short_soak_answers_every_request_with_and_without_work_ahead():
    on = bench_soak(requests=20, report_every=10, cache_budget_mb=64)
    off = bench_soak(requests=20, report_every=10, cache_budget_mb=64, warm_ahead=False)
    for result in (on, off):
        assert result["unanswered"] == 0 and result["errors"] == 0 and result["server_alive"]
        assert result["cache_within_budget"] and [r["requests"] for r in result["rows"]] == [10, 20]
    assert off["rows"][-1]["warmed_tokens"] == 0
