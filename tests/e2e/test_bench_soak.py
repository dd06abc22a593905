"""`bench soak` through the real server, short: every request answered and the KV cache within its budget,
with work ahead on (the user resting now and then and accepting the suggestion read meanwhile, so that
work ahead runs; every suggestion shown) and off (nothing worked ahead).  How much is worked ahead
depends on the machine and the suggestions, so it is not asserted: on a loaded machine (CI) even the
server's own turnaround between two requests can pass the prefetch's 0.1 s pause."""

from hirope_lsp.research.bench import bench_soak


def test_a_short_soak_answers_every_request_with_and_without_work_ahead():
    # the gate off: the rests end on a suggestion to accept (with it, most are hidden)
    on = bench_soak(requests=20, report_every=10, cache_budget_mb=64, pause_every=4, pause_s=0.5, gate=False)
    off = bench_soak(requests=20, report_every=10, cache_budget_mb=64, warm_ahead=False)
    for result in (on, off):
        assert result["unanswered"] == 0 and result["errors"] == 0 and result["server_alive"]
        assert result["cache_within_budget"] and [r["requests"] for r in result["rows"]] == [10, 20]
    assert on["accepted"] >= 1, "no rest ended on a suggestion: the accepts went untested"
    assert off["rows"][-1]["warmed_tokens"] == 0 and off["rows"][-1]["prefetched_answers"] == 0
