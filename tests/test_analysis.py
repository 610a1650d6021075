import numpy as np
import pytest
import torch

from fastntk import analysis


def test_kernel_distance_hand_cases():
    k = torch.tensor([[2.0, 1.0], [1.0, 2.0]])
    assert analysis.kernel_distance(k, 3 * k) == pytest.approx(0.0, abs=1e-15)
    assert analysis.kernel_distance(torch.eye(2), torch.tensor([[0.0, 1.0], [1.0, 0.0]])) == pytest.approx(1.0)
    # <I, K>_F = 4, |I| = sqrt 2, |K| = sqrt 10: 1 - 4 / sqrt 20
    assert analysis.kernel_distance(np.eye(2), k.numpy()) == pytest.approx(1 - 4 / np.sqrt(20))


def test_kernel_distance_refuses_mismatched_shapes():
    with pytest.raises(ValueError, match="same samples"):
        analysis.kernel_distance(torch.eye(2), torch.eye(3))
