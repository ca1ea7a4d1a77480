from ferry.core.rate import TokenBucket


def test_a_burst_of_one_second_then_the_rate() -> None:
    bucket = TokenBucket(100, now=0.0)
    assert bucket.reserve(100, 0.0) == 0.0  # the first second's worth goes at once
    assert bucket.reserve(50, 0.0) == 0.5
    # Half a second later the debt is paid: the next 100 bytes wait a second.
    assert bucket.reserve(100, 0.5) == 1.0


def test_the_average_holds_over_many_chunks() -> None:
    bucket = TokenBucket(1000, now=0.0)
    now = 0.0
    for _ in range(100):
        now += bucket.reserve(100, now)
    # 10 000 bytes at 1000 B/s with a 1000-byte burst: 9 s.
    assert abs(now - 9.0) < 1e-6


def test_idle_time_does_not_bank_more_than_the_burst() -> None:
    bucket = TokenBucket(100, now=0.0)
    assert bucket.reserve(100, 1000.0) == 0.0
    assert bucket.reserve(100, 1000.0) == 1.0


def test_zero_means_no_cap() -> None:
    assert TokenBucket(0, now=0.0).reserve(10**12, 0.0) == 0.0
