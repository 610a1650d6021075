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


def test_cuda_operator_products_and_solvers_stay_on_the_device() -> None:
    """NTKOperator on a CUDA model: products on the device equal the reference kernel times v;
    CG (on the host, products on the device) returns α on the device."""
    from fastntk.operator import NTKOperator, solve, trace_estimate

    c = CASES_BY_NAME["mlp"]
    model = c.build(torch.float64).cuda()
    x1, x2 = c.draw(4, torch.float64, seed=1).cuda(), c.draw(3, torch.float64, seed=2).cuda()
    full = reference_full("mlp", torch.float64, False)
    theta = full.permute(0, 2, 1, 3).reshape(full.shape[0] * full.shape[2], -1)
    v = torch.randn(theta.shape[1], 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    product = NTKOperator(model, x1, x2, block_size=2) @ v.cuda()
    assert product.device.type == "cuda"
    assert_kernel_close(product.cpu(), theta @ v, torch.float64)
    gram = NTKOperator(model, x1)
    solution = solve(gram, torch.ones(4, 3, dtype=torch.float64, device="cuda"), ridge=1e-2, rtol=1e-10)
    assert solution.alpha.device.type == "cuda" and solution.residual <= 1e-10
    assert trace_estimate(gram, 6, seed=0) > 0
