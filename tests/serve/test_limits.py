"""Pure parts: stop strings, what is safe to stream, keys, the token bucket (with a clock we advance)."""

import pytest

from bloombee_nb.serve.engine import find_stop, safe_length
from bloombee_nb.serve.errors import AuthenticationError, QueueFullError, RateLimitError
from bloombee_nb.serve.limits import Admission, RateLimiter, check_key


def test_find_stop_takes_the_earliest():
    assert find_stop("abc\ndef", ("\n",)) == 3
    assert find_stop("x = 1;;", ("=", ";;")) == 2
    assert find_stop("nothing", ("zz",)) is None and find_stop("a", ()) is None


def test_safe_length_holds_back_a_possible_stop_and_half_characters():
    assert safe_length("hello wo", ("world",)) == len("hello ")
    assert safe_length("hello", ("world",)) == 5
    assert safe_length("ab\ufffd", ()) == 2
    assert safe_length("ab", ()) == 2


def test_keys():
    assert check_key(None, ()) is None
    assert check_key("Bearer k2", ("k1", "k2")) == "k2"
    for bad in (None, "Bearer", "Basic k1", "Bearer k3"):
        with pytest.raises(AuthenticationError):
            check_key(bad, ("k1", "k2"))


def test_token_bucket_refills_at_the_rate():
    now = [0.0]
    limiter = RateLimiter(rate_per_minute=60, burst=2, clock=lambda: now[0])
    limiter.take("a"), limiter.take("a")
    with pytest.raises(RateLimitError) as err:
        limiter.take("a")
    assert err.value.retry_after_s == pytest.approx(1.0) and err.value.status == 429
    limiter.take("b")
    now[0] = 1.0
    limiter.take("a")


def test_admission_bounds_running_plus_waiting():
    adm = Admission(max_running=1, max_queue=1)
    adm.enter(), adm.enter()
    with pytest.raises(QueueFullError, match="1 requests are generating and 1 more are waiting"):
        adm.enter()
    adm.leave()
    adm.enter()
