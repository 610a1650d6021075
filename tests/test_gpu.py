"""Every method on CUDA tensors (skipped without a GPU)."""

from __future__ import annotations

import pytest
import torch

import fastntk
from cases import CASES_BY_NAME
from conftest import assert_kernel_close, reduce_full, reference_full

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


@pytest.mark.parametrize("method", ["jacobian", "vp", "structured", "auto"])
@pytest.mark.parametrize("case", ["mlp", "tutorial_cnn", "batchnorm_eval", "token_dict", "transformer", "groupnorm"])
@pytest.mark.parametrize("mode", ["full", "trace", "diagonal"])
def test_cuda_matches_reference(case: str, method: str, mode: str) -> None:
    c = CASES_BY_NAME[case]
    model = c.build(torch.float64).cuda()
    to_cuda = lambda x: {k: v.cuda() for k, v in x.items()} if isinstance(x, dict) else x.cuda()  # noqa: E731
    x1, x2 = to_cuda(c.draw(4, torch.float64, seed=1)), to_cuda(c.draw(3, torch.float64, seed=2))
    kernel = fastntk.ntk(model, x1, x2, mode=mode, method=method)
    assert kernel.device.type == "cuda"
    assert_kernel_close(kernel.cpu(), reduce_full(reference_full(case, torch.float64, False), mode), torch.float64)


def test_inputs_on_another_device_are_refused() -> None:
    c = CASES_BY_NAME["mlp"]
    with pytest.raises(fastntk.InputError, match="cuda"):
        fastntk.ntk(c.build().cuda(), c.draw(3))
