"""Property tests: AutoFlowGuide on randomly generated small models over every kind of support.

For each model, after set-up and after a few SVI steps: the ELBO is finite, every guide draw
lies in its site's support (given the upstream draws, for supports that depend on other
latents), log q is finite, and the median and quantiles lie in the support. For a site whose
support depends on other latents, the quantiles are marginal quantiles of the constrained draws
(see docs/guide.md), so they are checked against the union of the supports over the draws.
"""

import os
from dataclasses import dataclass

import pyro
import pyro.distributions as dist
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pyro import poutine
from pyro.distributions import constraints
from pyro.distributions.transforms import OrderedTransform
from pyro.infer import SVI, Trace_ELBO
from pyro.infer.autoguide.initialization import init_to_median, init_to_sample
from pyro.poutine.util import site_is_subsample

from pyro_flows import FLOWS, AutoFlowGuide

NUM_DRAWS = 1024
# More examples for a thorough search: PYRO_FLOWS_EXAMPLES=1000 pytest tests/test_properties.py
MAX_EXAMPLES = int(os.environ.get("PYRO_FLOWS_EXAMPLES", "40"))
QUANTILES = [0.01, 0.25, 0.5, 0.75, 0.99]


def _vector(size):
    return dist.Normal(torch.zeros(size), 1.5).to_event(1)


def _through(transform, base):
    return dist.TransformedDistribution(base, [transform])


class _Prior(dist.TorchDistribution):
    """A prior on a structured support, with an explicit density (torch's transformed
    distributions report the support of their last transform only: exp of an ordered vector
    claims a positive one)."""

    arg_constraints = {}

    def __init__(self, size, batch_shape=()):
        self.size = size
        super().__init__(torch.Size(batch_shape), self.event(size), validate_args=False)

    def expand(self, batch_shape, _instance=None):
        return type(self)(self.size, batch_shape)


class PositiveOrdered(_Prior):
    """The order statistics of `size` HalfNormal(1) draws."""

    support = constraints.positive_ordered_vector

    @staticmethod
    def event(size):
        return torch.Size([size])

    def sample(self, sample_shape=()):
        return torch.randn(self._extended_shape(sample_shape)).abs().sort(-1).values

    def log_prob(self, value):
        density = dist.HalfNormal(1.0).log_prob(value).sum(-1)
        return density + torch.lgamma(torch.tensor(self.size + 1.0))


class LowerCholesky(_Prior):
    """Normal(0, 1) below the diagonal and HalfNormal(1) on it."""

    support = constraints.lower_cholesky

    @staticmethod
    def event(size):
        return torch.Size([size, size])

    def sample(self, sample_shape=()):
        x = torch.randn(self._extended_shape(sample_shape)).tril()
        return x - 2 * x.diagonal(dim1=-2, dim2=-1).clamp(max=0).diag_embed()

    def log_prob(self, value):
        below = dist.Normal(0.0, 1.0).log_prob(value.tril(-1)).sum((-1, -2))
        diagonal = dist.HalfNormal(1.0).log_prob(value.diagonal(dim1=-2, dim2=-1)).sum(-1)
        return below - dist.Normal(0.0, 1.0).log_prob(torch.zeros(())) * self.size + diagonal


# Each kind: the prior of one site, given its size (vector sites) and the upstream site `a`.
PRIORS = {
    "real": lambda k, a: dist.Normal(0.0, 2.0),
    "positive": lambda k, a: dist.LogNormal(0.0, 1.0),
    "heavy_positive": lambda k, a: dist.HalfCauchy(1.0),
    "interval": lambda k, a: dist.Uniform(-2.0, 3.0),
    "unit_interval": lambda k, a: dist.Beta(2.0, 3.0),
    "simplex": lambda k, a: dist.Dirichlet(torch.ones(k + 1)),
    "ordered": lambda k, a: _through(OrderedTransform(), _vector(k + 1)),
    "positive_ordered": lambda k, a: PositiveOrdered(k + 1),
    "lower_cholesky": lambda k, a: LowerCholesky(k + 1),
    "corr_cholesky": lambda k, a: dist.LKJCholesky(k + 1, 1.5),
    "below_one_minus_a": lambda k, a: dist.Uniform(0.0, 1.0 - a),  # a in (0, 1)
    "from_a_to_a_plus_one": lambda k, a: dist.Uniform(a, a + 1.0),
    "above_a": lambda k, a: dist.Pareto(a + 0.5, 3.0),  # support (a + 0.5, inf)
}
ELEMENTWISE = {"real", "positive", "heavy_positive", "interval", "unit_interval"}
DEPENDENT = {"below_one_minus_a", "from_a_to_a_plus_one", "above_a"}


@dataclass(frozen=True)
class Site:
    kind: str
    size: int  # 1-3: the event size of multivariate kinds, the width of vectors of scalars
    layout: str  # "scalar", "vector" (to_event) or "plate"


def make_model(sites, plate_size):
    """A model with an upstream site `a` in (0, 1) and the given sites, each observed through
    a Normal likelihood of a function of its value (so that the posterior is not the prior)."""

    def model():
        a = pyro.sample("a", dist.Beta(2.0, 2.0))
        total = a
        plate = pyro.plate("p", plate_size)
        for i, site in enumerate(sites):
            with plate if site.layout == "plate" else _nothing():
                if site.layout == "vector" and site.kind in ELEMENTWISE | DEPENDENT:
                    upstream = a.unsqueeze(-1).expand(*a.shape, site.size)
                    prior = PRIORS[site.kind](site.size, upstream)
                    prior = prior.expand(upstream.shape).to_event(1)
                else:
                    prior = PRIORS[site.kind](site.size, a)
                value = pyro.sample(f"s{i}_{site.kind}", prior)
            total = total + value.reshape(-1)[:1].sum().clamp(-10, 10)
        pyro.sample("obs", dist.Normal(total, 2.0), obs=torch.tensor(0.5))

    return model


class _nothing:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


site_strategy = st.builds(
    Site,
    kind=st.sampled_from(sorted(PRIORS)),
    size=st.integers(1, 3),
    layout=st.sampled_from(["scalar", "vector", "plate"]),
)


def draws_and_supports(model, guide):
    """Vectorized guide draws, and the model's site distributions given them."""

    with torch.no_grad(), pyro.plate("draws", NUM_DRAWS, dim=-2):
        guide_trace = poutine.trace(guide).get_trace()
        model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace()
    return guide_trace, model_trace


def latent_sites(trace):
    return {
        name: site
        for name, site in trace.nodes.items()
        if site["type"] == "sample" and not site["is_observed"] and not site_is_subsample(site)
    }


def kind(name):
    return "unit_interval" if name == "a" else name.split("_", 1)[1]


def assert_point_in_support(model, point):
    """The model, given the point, gives every site a support that holds its value."""

    with torch.no_grad():
        trace = poutine.trace(poutine.condition(model, data=point)).get_trace()
    for name, value in point.items():
        support = trace.nodes[name]["fn"].support
        assert support.check(value).all(), f"{name}: {value} not in {support}"


def assert_in_marginal_support(name, value, site):
    """`value` lies in the support that the site has for at least one of the draws."""

    support = site["fn"].support
    inside = support.check(value.expand(site["value"].shape))
    assert inside.reshape(NUM_DRAWS, -1).any(0).all(), f"{name}: {value} not in {support}"


def check_guide(model, guide):
    loss = Trace_ELBO().loss(model, guide)
    assert torch.isfinite(torch.tensor(loss)), loss

    guide_trace, model_trace = draws_and_supports(model, guide)
    guide_trace.compute_log_prob()
    for name, site in latent_sites(guide_trace).items():
        if name not in model_trace:
            continue  # the packed latent
        support = model_trace.nodes[name]["fn"].support
        assert support.check(site["value"]).all(), f"{name}: draws outside {support}"
        assert torch.isfinite(site["log_prob"]).all(), f"{name}: log q not finite"

    # Marginal quantiles of elementwise sites whose support depends on another latent are
    # checked against the union of that support over the draws; the other sites' quantiles
    # (images of the unconstrained quantiles) must form a point of the joint support.
    quantiles = guide.quantiles(QUANTILES)
    median = guide.median()
    marginal = {name for name in quantiles if name in guide._dependent_sites}
    marginal &= {name for name in quantiles if model_trace.nodes[name]["fn"].event_dim == 0}
    for values in [*zip(*quantiles.values(), strict=True), median.values()]:
        point = dict(zip(quantiles, values, strict=True))
        assert_point_in_support(model, {k: v for k, v in point.items() if k not in marginal})
        for name in marginal:
            assert_in_marginal_support(name, point[name], model_trace.nodes[name])
    for name, values in quantiles.items():
        assert values.shape == (len(QUANTILES), *guide.prototype_trace.nodes[name]["value"].shape)
        if kind(name) in ELEMENTWISE:
            assert (values.diff(dim=0) >= 0).all(), f"{name}: quantiles not increasing"
        torch.testing.assert_close(median[name], values[QUANTILES.index(0.5)])


# (dtype, init_scale). A float32 guide 3 units wide in unconstrained space draws ordered
# vectors whose gaps are below float32's resolution (u < -16: a tie, log-density -inf).
PRECISIONS = [
    (torch.float32, 0.1),
    (torch.float32, 1.0),
    (torch.float64, 0.1),
    (torch.float64, 1.0),
    (torch.float64, 3.0),
]


@settings(max_examples=MAX_EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    sites=st.lists(site_strategy, min_size=1, max_size=3),
    plate_size=st.integers(1, 3),
    flow=st.sampled_from(sorted(FLOWS)),
    precision=st.sampled_from(PRECISIONS),
    init=st.sampled_from(["median", "sample"]),
    stl=st.booleans(),
)
def test_guide_on_random_models(sites, plate_size, flow, precision, init, stl):
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    dtype, init_scale = precision
    torch.set_default_dtype(dtype)
    model = make_model(sites, plate_size)
    init_loc_fn = init_to_median if init == "median" else init_to_sample
    guide = AutoFlowGuide(
        model,
        flow=flow,
        init_scale=init_scale,
        init_loc_fn=init_loc_fn,
        stl=stl,
        hidden_features=(8,),
    )
    check_guide(model, guide)
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 0.05}), Trace_ELBO())
    for _ in range(5):
        loss = svi.step()
        assert torch.isfinite(torch.tensor(loss))
    check_guide(model, guide)


# The bijections that pyro_flows.supports adds to torch's biject_to -------------------------
