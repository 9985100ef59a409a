"""pyro_flows._made builds zuko's masked autoregressive layers in O(D H): these tests fail if
zuko's own construction (masks, initial weights, the transformation) changes under it."""

from functools import partial

import pytest
import torch
import zuko
from zuko.nn import MaskedMLP
from zuko.transforms import MonotonicRQSTransform

from pyro_flows._made import masked_autoregressive, masks

SPLINE = {"univariate": partial(MonotonicRQSTransform, slope=1e-3), "shapes": [(4,), (4,), (3,)]}


@pytest.mark.parametrize("features", [1, 2, 5, 33])
@pytest.mark.parametrize("passes", [None, 2], ids=["autoregressive", "coupling"])
@pytest.mark.parametrize("randperm", [False, True])
@pytest.mark.parametrize("spline", [False, True], ids=["affine", "spline"])
def test_made_is_zukos(features, passes, randperm, spline):
    """The O(D H) construction gives zuko's layers: same masks, weights and outputs."""

    options = {"transforms": 2, "randperm": randperm, "passes": passes, "hidden_features": [8, 5]}
    torch.manual_seed(1)
    if spline:
        expected = zuko.flows.NSF(features, bins=4, **options).transform
    else:
        expected = zuko.flows.MAF(features, **options).transform
    torch.manual_seed(1)
    built = masked_autoregressive(features, **options, **(SPLINE if spline else {}))
    reference = expected.state_dict()
    assert built.state_dict().keys() == reference.keys()
    for name, value in built.state_dict().items():
        assert torch.equal(value, reference[name]), name
    with torch.no_grad():
        for p in built.parameters():  # away from the identity
            p.add_(0.1 * torch.randn_like(p))
        expected.load_state_dict(built.state_dict())
    x = torch.randn(4, features)
    torch.testing.assert_close(built()(x), expected()(x), rtol=0, atol=0)


@pytest.mark.parametrize("hidden", [[3], [8, 5], [16, 16, 4]])
@pytest.mark.parametrize("order", [[0, 1, 2, 3], [2, 0, 3, 1], [0, 0, 1, 1]])
def test_masks_are_zukos_masked_mlp(order, hidden):
    """The closed-form masks equal those zuko's MaskedMLP derives from the adjacency matrix."""

    order = torch.tensor(order)
    total = 2
    outputs = torch.repeat_interleave(order, total)
    adjacency = outputs[:, None] > order[None, :]
    mlp = MaskedMLP(adjacency, hidden_features=hidden)
    expected = [layer.mask.bool() for layer in mlp if hasattr(layer, "mask")]
    found = masks(order, total, hidden)
    assert len(found) == len(expected)
    for mine, theirs in zip(found, expected, strict=True):
        assert torch.equal(mine, theirs)


def test_one_order_value_is_refused():
    with pytest.raises(ValueError, match="at least two distinct values"):
        masks(torch.zeros(3, dtype=torch.long), 1, [4])
