"""pyro_flows._packing: a module's parameters as views of one flat tensor."""

import pickle

import pytest
import torch
import torch.nn as nn

from pyro_flows._packing import ParameterPacking


def net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))


def test_packed_module_computes_as_before_and_holds_no_parameters():
    original, packed = net(), net()
    x = torch.randn(5, 3)
    packing, values = ParameterPacking.pack(packed)
    assert list(packed.parameters()) == []
    assert values.shape == (packing.numel,) == (3 * 4 + 4 + 4 * 2 + 2,)
    torch.testing.assert_close(packed(x), original(x), rtol=0, atol=0)


def test_gradients_reach_the_flat_tensor():
    original, packed = net(), net()
    packing, values = ParameterPacking.pack(packed)
    flat = nn.Parameter(values)
    packing.bind(flat)
    x = torch.randn(5, 3)
    packed(x).square().sum().backward()
    original(x).square().sum().backward()
    expected = torch.cat([p.grad.reshape(-1) for p in original.parameters()])
    torch.testing.assert_close(flat.grad, expected)


def test_multipliers_scale_what_the_layer_sees():
    packed = net()
    weight = packed[0].weight.detach().clone()
    packing, values = ParameterPacking.pack(packed, {packed[0].weight: 0.25})
    # the flat tensor stores value / multiplier, and the layer sees multiplier * stored
    torch.testing.assert_close(values[:12].reshape(4, 3), weight / 0.25)
    torch.testing.assert_close(packed[0].weight, weight)


def test_binding_another_tensor_and_a_wrong_size():
    packed = net()
    packing, values = ParameterPacking.pack(packed)
    packing.bind(torch.zeros_like(values))
    assert packed(torch.randn(2, 3)).abs().sum() == 0
    with pytest.raises(ValueError, match=f"Expected {packing.numel} packed parameters"):
        packing.bind(torch.zeros(3))


def test_unbind_then_pickle_then_bind():
    packed = net()
    packing, values = ParameterPacking.pack(packed)
    packing.unbind()
    packed_copy, packing_copy = pickle.loads(pickle.dumps((packed, packing)))
    packing_copy.bind(values)
    packing.bind(values)
    x = torch.randn(2, 3)
    torch.testing.assert_close(packed_copy(x), packed(x))
