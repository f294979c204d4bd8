import itertools

import pytest

from lightning_hprune.core import schedules as S


@pytest.mark.parametrize("name", ["geometric", "cubic", "linear", "constant", "oneshot"])
@pytest.mark.parametrize("n", [1, 2, 5, 10])
def test_schedules_are_monotone_and_complete(name, n):
    fn = S.resolve_schedule(name)
    values = [fn(k, n) for k in range(n)]
    assert all(0 < v <= 1 for v in values)
    assert all(b >= a for a, b in itertools.pairwise(values))
    assert values[-1] == pytest.approx(1.0)


def test_geometric_shares_decay_by_the_factor():
    shares = S.event_shares(lambda k, n: S.geometric(k, n, 0.9), 6)
    assert sum(shares) == pytest.approx(1.0)
    for a, b in itertools.pairwise(shares):
        assert b / a == pytest.approx(0.9)
    # r_0 = (1 - d) / (1 - d^n)
    assert shares[0] == pytest.approx(0.1 / (1 - 0.9**6))


def test_geometric_decay_one_is_linear():
    assert [S.geometric(k, 4, 1.0) for k in range(4)] == pytest.approx([0.25, 0.5, 0.75, 1.0])


def test_cubic_matches_zhu_gupta():
    n = 5
    for k in range(n):
        t = (k + 1) / n
        assert S.cubic(k, n) == pytest.approx(1 - (1 - t) ** 3)
    # front-loaded: the first share is the largest
    shares = S.event_shares(S.cubic, n)
    assert shares[0] == max(shares)


def test_constant_is_one_shot():
    assert [S.constant(k, 3) for k in range(3)] == [1.0, 1.0, 1.0]


def test_callable_schedule_is_clipped_and_completes():
    fn = S.resolve_schedule(lambda k: 0.3 * k - 0.1)
    assert fn(0, 4) == 0.0
    assert fn(2, 4) == pytest.approx(0.5)
    assert fn(3, 4) == 1.0  # the last event always completes the target


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"schedule": "exponential"}, "Expected argument `schedule` to be one of"),
        ({"schedule": 3}, "but got 3"),
        ({"schedule": "geometric", "decay": 0.0}, "Expected argument `decay`"),
        ({"schedule": "geometric", "decay": -1.0}, "Expected argument `decay`"),
        ({"schedule": "geometric", "decay": 1.5}, "Expected argument `decay`"),
    ],
)
def test_invalid_schedules(kwargs, match):
    with pytest.raises(ValueError, match=match):
        S.resolve_schedule(**kwargs)


@pytest.mark.parametrize(("k", "n"), [(-1, 3), (3, 3), (0, 0)])
def test_event_index_out_of_range(k, n):
    with pytest.raises(ValueError, match="Expected"):
        S.linear(k, n)
