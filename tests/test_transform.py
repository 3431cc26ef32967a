import math

import pytest
import torch

from lift_ao.transform import Rotation, make_rotation, padded_in_features, rotate, unrotate


@pytest.mark.parametrize("K,d", [(576, 10), (1536, 10), (4096, 8), (192, 10), (7, 10), (14336, 10), (33, 6)])
def test_padding_is_a_balanced_multiple_of_the_block(K, d):
    kp, k1, k2 = padded_in_features(K, d)
    assert kp >= K and kp % d == 0 and k1 * k2 == kp and k1 <= k2
    assert kp - K < 8 * d  # padding stays small
    assert kp < 64 or 4 * k1 >= math.isqrt(kp)


@pytest.mark.parametrize("K,d", [(576, 10), (64, 8), (100, 6)])
def test_rotation_is_orthogonal_and_inverted_by_unrotate(K, d):
    r = make_rotation(K, d, seed=3)
    s, l, rr = (t.double() for t in (r.signs, r.left, r.right))
    x = torch.randn(5, K, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    u = rotate(x, s, l, rr)
    assert u.shape == (5, r.padded_features)
    torch.testing.assert_close(u.norm(dim=1), x.norm(dim=1), rtol=1e-6, atol=0)
    torch.testing.assert_close(unrotate(u, s, l, rr, K), x, rtol=0, atol=1e-6)
    # Weight rows and activations use the same map, so inner products are preserved (to the
    # float32 precision the rotation is stored in).
    w = torch.randn(3, K, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(rotate(w, s, l, rr) @ u.T, w @ x.T, rtol=1e-5, atol=1e-5)


def test_rotation_is_deterministic_and_seeded():
    a, b, c = make_rotation(576, 10, 0), make_rotation(576, 10, 0), make_rotation(576, 10, 1)
    assert torch.equal(a.left, b.left) and torch.equal(a.signs, b.signs)
    assert not torch.equal(a.signs, c.signs)


def test_power_of_two_factors_are_hadamard():
    r = make_rotation(4096, 8)
    assert r.left.shape == (64, 64)
    torch.testing.assert_close(r.left.abs(), torch.full((64, 64), 1 / 8.0))


def test_a_seed_gives_the_same_rotation_at_any_thread_count():
    """LAPACK's blocked QR rounded differently with 1 and 2 threads: K = 13824 (factors 30 × 461) got
    another rotation_right entry, so checkpoints and resumed codes depended on the machine's threads."""
    threads = torch.get_num_threads()
    try:
        rotations = []
        for count in (1, 2):
            torch.set_num_threads(count)
            rotations.append(make_rotation(13824, 10, seed=0))
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(getattr(rotations[0], n), getattr(rotations[1], n)) for n in ("signs", "left", "right"))
    assert torch.get_num_threads() == threads


@pytest.mark.parametrize("left,right,message", [
    ((4, 5), (5, 5), r"rotation_left must be a square \(k1, k1\) matrix, got \(4, 5\)"),
    ((4, 4), (5, 4), r"rotation_right must be a square \(k2, k2\) matrix, got \(5, 4\)"),
    ((4, 4), (4, 4), r"signs must be \(16,\) = k1·k2 for factors \(4, 4\) and \(4, 4\), got \(20,\)"),
])
def test_a_rotation_from_factors_that_do_not_fit_is_refused(left, right, message):
    """rotate reads k1 and k2 off the factors' first dimension: a (4, 5) P1 gave 25 features from 20."""
    g = torch.Generator().manual_seed(0)
    with pytest.raises(ValueError, match=message):
        Rotation(torch.ones(20), torch.randn(left, generator=g), torch.randn(right, generator=g))
