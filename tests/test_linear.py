"""pyro_flows._linear: the guide's linear layer S = S_0 T, against dense linear algebra."""

import pytest
import torch

from pyro_flows._linear import LinearScale, root_factor


def random_root(size, rank, generator):
    scale = torch.rand(size, generator=generator, dtype=torch.float64) + 0.5
    if rank == 0:
        return root_factor(scale)
    basis, _ = torch.linalg.qr(torch.randn(size, rank, generator=generator, dtype=torch.float64))
    core = torch.randn(rank, rank, generator=generator, dtype=torch.float64).tril() * 0.3
    core.diagonal().abs_()  # I + C invertible: a positive diagonal
    return root_factor(scale, basis, core)


def random_scale(size, rank, dense, generator):
    root = random_root(size, rank, generator)
    diag = torch.rand(size, generator=generator, dtype=torch.float64) + 0.5
    if dense:
        tril = 0.3 * torch.randn(size * (size - 1) // 2, generator=generator, dtype=torch.float64)
        return LinearScale(root, diag, tril=tril)
    left = 0.3 * torch.randn(size, 2, generator=generator, dtype=torch.float64)
    right = 0.3 * torch.randn(size, 2, generator=generator, dtype=torch.float64)
    return LinearScale(root, diag, left=left, right=right)


@pytest.mark.parametrize("rank", [0, 3])
@pytest.mark.parametrize("dense", [True, False], ids=["dense", "low_rank"])
def test_against_the_dense_matrix(rank, dense):
    generator = torch.Generator().manual_seed(0)
    scale = random_scale(6, rank, dense, generator)
    matrix = scale.apply(torch.eye(6, dtype=torch.float64)).mT  # columns S e_j
    y = torch.randn(4, 6, generator=generator, dtype=torch.float64)
    torch.testing.assert_close(scale.apply(y), y @ matrix.mT)
    torch.testing.assert_close(scale.solve(scale.apply(y)), y)
    torch.testing.assert_close(scale.log_abs_det(), torch.linalg.slogdet(matrix)[1])
    torch.testing.assert_close(scale.variances(), (matrix @ matrix.mT).diagonal())
    # rows of any batch shape
    torch.testing.assert_close(scale.apply(y.reshape(2, 2, 6)), scale.apply(y).reshape(2, 2, 6))


def test_identity_start():
    root = root_factor(torch.tensor([2.0, 3.0]))
    scale = LinearScale(root, torch.ones(2), tril=torch.zeros(1))
    y = torch.tensor([[1.0, -1.0]])
    torch.testing.assert_close(scale.apply(y), torch.tensor([[2.0, -3.0]]))
    torch.testing.assert_close(scale.variances(), torch.tensor([4.0, 9.0]))
