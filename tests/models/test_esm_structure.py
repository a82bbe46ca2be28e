"""The distance bias's Gaussian kernels (models/esm_structure.py) against the plain formula."""
import math

import pytest
import torch

from megatron_p2t.models.esm_structure import _GaussianKernels, gaussian_kernels


def _plain(d, means, stds, mask):
    std = stds.abs() + 1e-5
    phi = torch.exp(-0.5 * ((d.unsqueeze(-1) - means) / std) ** 2) / (math.sqrt(2 * math.pi) * std)
    return phi if mask is None else phi * mask.unsqueeze(-1)


def _inputs(dtype, masked):
    g = torch.Generator().manual_seed(0)
    d = (torch.rand(2, 5, 7, generator=g, dtype=dtype) * 20).requires_grad_()
    means = torch.linspace(0, 24, 6, dtype=dtype).requires_grad_()
    # a negative width too: |sigma| is the width
    stds = (torch.rand(6, generator=g, dtype=dtype) * 3 + 0.5).mul(torch.tensor([1, -1] * 3)).requires_grad_()
    mask = torch.rand(2, 5, 7, generator=g) > 0.3 if masked else None
    return d, means, stds, mask, torch.randn(2, 5, 7, 6, generator=g, dtype=dtype)


@pytest.mark.parametrize("masked", [False, True])
def test_gaussian_kernels_values_and_gradients_are_the_formulas(masked):
    """The written-out gradients of distances, centres and widths equal autograd's through the plain formula (in
    float64, to rounding) and pass gradcheck; in float32, as the model runs them, they agree to float32's rounding;
    a masked pair is 0 and sends no gradient, and a kernel under the floor is 0."""
    d, means, stds, mask, w = _inputs(torch.float64, masked)
    ours, plain = _GaussianKernels.apply(d, means, stds, mask), _plain(d, means, stds, mask)
    torch.testing.assert_close(ours, plain, rtol=1e-12, atol=1e-15)
    got = torch.autograd.grad((ours * w).sum(), (d, means, stds))
    want = torch.autograd.grad((plain * w).sum(), (d, means, stds))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-13)
    assert torch.autograd.gradcheck(_GaussianKernels.apply, (d, means, stds, mask))
    far = plain.detach() < 1e-27                    # under the floor, exp(-60): exactly 0 (these inputs have some)
    assert far.any() and (ours[far] == 0).all()
    if masked:
        assert (ours[~mask] == 0).all() and (got[0][~mask] == 0).all()

    d, means, stds, mask, w = _inputs(torch.float32, masked)
    ours, plain = gaussian_kernels(d, means, stds, mask), _plain(d, means, stds, mask)
    torch.testing.assert_close(ours, plain)
    for a, b in zip(torch.autograd.grad((ours * w).sum(), (d, means, stds)),
                    torch.autograd.grad((plain * w).sum(), (d, means, stds))):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
