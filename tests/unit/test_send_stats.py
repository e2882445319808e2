"""send/stats.py: what the scheduler's delivery results become for metrics and the page."""

from __future__ import annotations

from pyqmail.send.stats import BUCKETS, RECENT, SendStats


def test_results_histogram_and_deferrals() -> None:
    now = [1000.0]
    st = SendStats(lambda: now[0])
    st.delivery("local", 1, "a@test.example", "K", "did_1+0+0/", birth=999.7)
    st.delivery("remote", 2, "b@Slow.Example", "Z", "connect failed", birth=990.0)
    st.delivery("remote", 3, "c@slow.example", "Z", "timed out", birth=990.0)
    st.delivery("remote", 4, "d@gone.example", "D", "no host", birth=0.0)
    assert st.deliveries[("local", "success")] == 1
    assert st.deliveries[("remote", "deferral")] == 2
    assert st.deliveries[("remote", "failure")] == 1
    assert sum(st.buckets) == 1  # deferrals and unknown births are not final delays
    assert st.buckets[BUCKETS.index(0.5)] == 1  # 0.3 s falls in the le=0.5 bucket
    ((dest, d),) = st.top_deferred(5)
    assert (dest, d.count, d.error) == ("slow.example", 2, "timed out")
    assert [r.msg for r in st.recent] == [1, 2, 3, 4]
    assert st.per_minute() == 2 / 60


def test_recent_is_bounded() -> None:
    st = SendStats()
    for i in range(RECENT + 5):
        st.delivery("local", i, "a@b", "K", "ok", 0.0)
    assert len(st.recent) == RECENT and st.recent[0].msg == 5
