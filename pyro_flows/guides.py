r"""The normalizing-flow autoguide."""

from __future__ import annotations

__all__ = ["AutoFlowGuide"]

import pickle
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import ExitStack
from types import SimpleNamespace

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.distributions import constraints
from pyro.infer.autoguide import AutoContinuous
from pyro.nn import PyroParam
from torch import Tensor
from torch.distributions import Transform
from zuko.transforms import ComposedTransform

from ._latent import PackedLatent, explained_setup_errors
from ._linear import DENSE_MAX, RANK, LinearScale, root_factor, tril_speed
from ._local import LOCAL_KINDS, LocalSites, check_subsample, local_sites
from ._packing import ParameterPacking
from ._pathfinder import RootFactor
from ._start import STARTS, Start, find_start
from .distributions import FlowPosterior, detached_log_prob
from .flows import FLOWS, as_lazy_transform, check_flow, fan_in_multipliers, flow_speed
from .initialization import check_init_scale, init_to_feasible


class _ModelRef(tuple):
    r"""A guide's reference to its model, ``(model,)``, that survives copies.

    Pyro's guides drop their model when they are pickled or deep-copied (a closure does not
    pickle), from the original guide too, and can then no longer trace it. This reference is
    shared by deep copies, and pickled where the model pickles (a module-level function);
    else the unpickled guide holds ``(None,)``.
    """

    def __deepcopy__(self, memo: dict) -> _ModelRef:
        return self

    def __reduce__(self) -> tuple:
        try:
            pickle.dumps(self[0])
        except (pickle.PicklingError, AttributeError, TypeError):
            return _ModelRef, ((None,),)
        return _ModelRef, (tuple(self),)


def _required(ref: _ModelRef) -> Callable[..., object]:
    if ref[0] is None:
        raise ValueError(
            "This guide was unpickled without its model, which does not pickle (a local "
            "function or a lambda), and it needs the model here (set-up, supports that "
            "depend on other latents, data of a new shape). Define the model at module "
            "level, or build a new AutoFlowGuide of the model and load this guide's "
            "state_dict() into it."
        )
    return ref[0]


class AutoFlowGuide(AutoContinuous):
    r"""Creates a normalizing-flow autoguide: a drop-in replacement for ``AutoNormal``.

    All global latent sites are mapped to an unconstrained vector :math:`z \in \mathbb{R}^D`
    (as in Pyro's :class:`~pyro.infer.autoguide.AutoContinuous`) on which the guide places

    .. math:: z = \mu_0 + S_0 \left(c \odot m + T f(\epsilon)\right),
        \qquad \epsilon \sim \mathcal{N}(0, I),

    where :math:`N(\mu_0, S_0 S_0^\top)` is the start (see ``init``), :math:`m` and the
    linear layer :math:`T` are learned from zero and the identity, and :math:`f` is a stack
    of zuko flow layers, each starting as the identity: at step 0 the guide *is* the start's
    Gaussian. The location and scale are trained in the start's whitened coordinates, so a
    step of Adam moves the guide by about the same fraction of a posterior sd whatever the
    posterior's scale. :math:`T` is dense lower-triangular up to 200 coordinates, diagonal
    plus rank 8 above (see :mod:`pyro_flows._linear`). Drawing a sample and scoring it costs
    one pass through each layer.

    The defaults are for the loop a user already has (``SVI``, ``Adam({"lr": 0.01})``,
    ``Trace_ELBO()``, one particle): ``init="pathfinder"`` (a Gaussian close to the
    posterior before the first step, where ``AutoNormal`` starts at the prior's median
    whatever the data say) and ``stl=True`` (a gradient whose noise vanishes as the guide
    approaches the posterior). Latent sites inside subsampled plates (local latents) get a
    per-element guide of the plate's full size, as ``AutoNormal`` does (``local``).

    Sites whose support depends on other latents (e.g. ``b ~ Uniform(0, 1 - a)``) are
    mapped through the support their distribution has given the upstream draws, with the
    matching log-Jacobian; models without such sites pay nothing for this.

    :meth:`median` and :meth:`quantiles` are Monte Carlo estimates from
    ``num_quantile_samples`` draws with a fixed seed (deterministic, and leaving the global
    random state alone): per coordinate of :math:`z`, mapped through each site's support.
    For sites with elementwise supports (real, positive, interval, ...) these are the
    marginal quantiles; for multivariate supports (simplex, Cholesky factors, ...) they are
    the image of the unconstrained quantiles, as in Pyro's guides.

    Default flow: ``"iaf"`` with 3 layers of (64, 64) hidden units, chosen on the benchmark
    (12 targets, 3 seeds, 5,000 steps each; see the docs' benchmark page): among the flow
    families it had the best or second-best PSIS k̂ on 7 of 12 targets at the lowest cost
    per step, 1.1-2.2x ``AutoNormal``'s up to 10 dimensions (1.29x with 8 particles on eight
    schools, timed interleaved) against 1.7-3.9x for the spline flows. ``"nsf"`` is better on
    strongly curved posteriors of a few dimensions (k̂ 0.24 against 0.49 on a banana).

    Arguments:
        model: A Pyro model.
        flow: A flow family by name (one of ``"iaf"``, ``"nsf"``, ``"nsf_coupling"``,
            ``"realnvp"``; see :mod:`pyro_flows.flows`) or a callable that, given the number
            of features :math:`D`, returns a zuko ``Flow`` (its transform is used), a zuko
            ``LazyTransform`` or a torch ``Transform`` of vectors, applied to
            :math:`\epsilon`. A callable's flow should start as the identity for the step-0
            guarantee above (see :func:`~pyro_flows.flows.identity_init_`).
        init: How the guide finds its start before the first step: ``"pathfinder"``
            (Zhang et al., 2022: the Gaussian of best ELBO along an L-BFGS path from
            ``init_loc_fn``'s point), ``"laplace"`` (the mode and the inverse Hessian there)
            or ``"prior"`` (``init_loc_fn``'s point with ``init_scale``, ``AutoNormal``'s
            start, trained in raw unconstrained units). The automatic starts fall back to
            ``"prior"`` with a :class:`~pyro_flows.StartWarning` that says why where they
            cannot run (subsampled models, a path into a funnel's neck, ...) or where the
            prior start has the higher ELBO estimate. See :doc:`/initialization`.
        init_loc_fn: A per-site initialization function (as in Pyro's autoguides); the
            default, :func:`~pyro_flows.init_to_feasible`, is the image of zero under each
            site's support bijection.
        init_scale: The initial scale of every unconstrained coordinate for ``init="prior"``
            (and the fallback), or a dict from site names to scales (a number, or a tensor
            that broadcasts to the site's unconstrained shape; sites left out get 0.1), e.g.
            the ``scales`` of :func:`~pyro_flows.laplace_start`; also the initial scale of
            local latents.
        create_plates: As in Pyro's ``AutoNormal``: a function of the model's arguments that
            returns the guide's plates (one or a list), e.g. subsampled ones.
        stl: Whether to use the "sticking the landing" gradient (the guide's log-density is
            computed with stopped-gradient parameters; O(D) per draw for every flow family).
        local: The guide of local latents (sites in subsampled plates): ``"mean_field"``
            (a Normal per element, as ``AutoNormal``) or ``"structured"`` (each element's
            location also depends linearly on the global draw). See :doc:`/big-data`.
        local_guide: An amortized guide of the local latents instead of per-element
            parameters, for plates too large for them: a :class:`torch.nn.Module` (an
            encoder) called with the model's arguments, ``local_guide(*args, **kwargs)``,
            that returns a dict from each local site's name to the unconstrained location
            and scale of the batch's elements, each of the site's subsampled shape (so the
            model should take the batch's rows as arguments, with
            ``pyro.plate(..., subsample=index)``). Its parameters are trained with the
            guide's. See :doc:`/big-data`.
        num_quantile_samples: The number of draws behind :meth:`median` and
            :meth:`quantiles`.
        flow_options: Options of the named flow family (zuko's names: ``transforms``,
            ``hidden_features``, ``bins``, ``randperm``, ``activation``, ...).

    Example:
        >>> import pyro, pyro.distributions as dist
        >>> from pyro.infer import SVI, Trace_ELBO
        >>> def model(y):
        ...     mu = pyro.sample("mu", dist.Normal(0.0, 10.0))
        ...     with pyro.plate("data", len(y)):
        ...         pyro.sample("y", dist.Normal(mu, 1.0), obs=y)
        >>> guide = AutoFlowGuide(model)
        >>> svi = SVI(model, guide, pyro.optim.Adam({"lr": 0.01}), Trace_ELBO())
        >>> loss = svi.step(torch.tensor([0.5, 1.5]))
        >>> sorted(guide.median(torch.tensor([0.5, 1.5])))
        ['mu']
    """

    def __init__(
        self,
        model: Callable[..., object],
        *,
        flow: str | Callable[[int], object] = "iaf",
        init: str = "pathfinder",
        init_loc_fn: Callable[[dict], Tensor] = init_to_feasible,
        init_scale: float | Mapping[str, float | Tensor] = 0.1,
        create_plates: Callable[..., object] | None = None,
        stl: bool = True,
        local: str = "mean_field",
        local_guide: torch.nn.Module | None = None,
        num_quantile_samples: int = 4096,
        **flow_options: object,
    ) -> None:
        init_scale = check_init_scale(init_scale)
        if init not in STARTS:
            raise ValueError(f"init={init!r}: use one of {list(STARTS)}.")
        if local not in LOCAL_KINDS:
            raise ValueError(f"local={local!r}: use one of {list(LOCAL_KINDS)}.")
        if local_guide is not None and not isinstance(local_guide, torch.nn.Module):
            raise TypeError(
                f"local_guide must be a torch.nn.Module (an encoder), got "
                f"{type(local_guide).__name__}: its parameters are trained with the guide's."
            )
        if local_guide is not None and local != "mean_field":
            raise ValueError(
                f"local={local!r} with local_guide: an amortized local guide gives each "
                "element's location and scale itself; leave local at 'mean_field'."
            )
        if not isinstance(num_quantile_samples, int) or num_quantile_samples < 2:
            raise ValueError(f"num_quantile_samples={num_quantile_samples!r}: use an int >= 2.")
        check_flow(flow, flow_options)
        super().__init__(model, init_loc_fn=init_loc_fn)
        self.create_plates = create_plates  # AutoContinuous does not pass it on
        self._model = _ModelRef(self._model)  # wrapped in init_loc_fn by AutoContinuous
        self._user_model = _ModelRef((model,))
        self.init_scale = init_scale
        self.init = init
        self.local = local
        self.local_guide = local_guide
        self.start: Start | None = None
        self._local: LocalSites | None = None
        self._pending_local: dict[str, Tensor] = {}
        self.flow_name = flow if isinstance(flow, str) else None
        self._flow_factory = FLOWS[flow] if isinstance(flow, str) else flow
        self.flow_options = dict(flow_options)
        self.stl = bool(stl)
        self.num_quantile_samples = num_quantile_samples
        self.latent_dim = None
        self._latent: PackedLatent | None = None

    def __getstate__(self) -> dict:
        if hasattr(self, "_packing"):
            self._packing.unbind()  # views are rebound at the next use
        model = self._model
        state = super().__getstate__()  # Pyro's drops the model, from this guide too
        self._model = state["_model"] = model
        return state

    @property
    def model(self) -> Callable[..., object]:
        r"""The model, as traced at set-up (inside ``init_loc_fn``)."""

        return _required(self._model)

    @property
    def flow_config(self) -> dict[str, object]:
        r"""The flow family and its options, e.g. ``{"flow": "iaf", "transforms": 3}``."""

        name = self.flow_name
        if name is None:
            name = getattr(self._flow_factory, "__name__", type(self._flow_factory).__name__)
        init_scale = self.init_scale if isinstance(self.init_scale, float) else "per site"
        config = {"flow": name, **self.flow_options, "init": self.init}
        return config | {"init_scale": init_scale, "stl": self.stl}

    # Set-up -----------------------------------------------------------------------------

    def _setup_prototype(self, *args: object, **kwargs: object) -> None:
        model = _required(self._user_model)
        with explained_setup_errors(model, args, kwargs) as prototype:
            # AutoContinuous's own set-up maps supports with torch's biject_to only.
            super(AutoContinuous, self)._setup_prototype(*args, **kwargs)
            prototype.trace = self.prototype_trace
            found = local_sites(self.prototype_trace)
            self._local = LocalSites(found) if found else None
            if self.local_guide is not None and not found:
                raise ValueError(
                    "AutoFlowGuide(local_guide=...) was given, but the model has no latent "
                    "site inside a subsampled plate (pyro.plate(..., subsample_size=...) or "
                    "subsample=...): leave local_guide out."
                )
            self._latent = PackedLatent(
                model, self.prototype_trace, args, kwargs, local=frozenset(found)
            )
        self.latent_dim = self._latent.dim
        self._cond_indep_stacks = {
            name: site["cond_indep_stack"] for name, site in self._latent.sites.items()
        }
        self._arg_shapes = _shapes(args, kwargs)
        if "shift" in self._pyro_params:  # parameters loaded from a state dict
            loaded_dim = self.shift.shape[-1]
            if loaded_dim != self.latent_dim:
                raise ValueError(
                    f"This guide's parameters were loaded for {loaded_dim} latent dimensions, "
                    f"but the model has {self.latent_dim}: load a state dict saved from a guide "
                    "of the same model."
                )
            self._build_local()
            return
        init_loc = self._latent.initial()
        for site, value in self._latent.unpack(init_loc):
            if not torch.isfinite(value).all():
                raise ValueError(
                    f"init_loc_fn gave site '{site['name']}' a value outside its support "
                    "(unconstrained value not finite): pass an init_loc_fn that returns a "
                    "value strictly inside the support."
                )
        self.start = find_start(self.init, self._latent, model, args, kwargs, self.init_scale)
        self._build_parameters(self.start)
        self._build_local()

    def _build_local(self) -> None:
        # The local sites' parameters, and values loaded before the set-up (load_state_dict).
        if self._local is None:
            return
        amortized = self.local_guide is not None
        self._local.build(self, self.init_scale, self.local, self.latent_dim, amortized)
        if self._pending_local:
            pending, self._pending_local = self._pending_local, {}
            super().load_state_dict(pending, strict=False)

    @property
    def _dependent_sites(self) -> frozenset[str]:
        return frozenset() if self._latent is None else self._latent.dependent

    def _unpack_latent(self, latent: Tensor) -> Iterator[tuple[dict, Tensor]]:
        # Pyro's AutoContinuous hook (NeuTraReparam unpacks through it).
        return self._latent.unpack(latent)

    def _build_parameters(self, start: Start) -> None:
        loc = start.loc.detach()
        size = len(loc)
        flow = as_lazy_transform(self._flow_factory(size, **self.flow_options), size)
        flow = flow.to(device=loc.device, dtype=loc.dtype)
        multipliers = {}
        if self.flow_name is not None:
            fan_in, speed = fan_in_multipliers(flow), flow_speed(size)
            multipliers = {p: fan_in.get(p, 1.0) * speed for p in flow.parameters()}
        self._packing, values = ParameterPacking.pack(flow, multipliers)
        self.flow = flow
        self.flow_params = PyroParam(values)
        root = start.root
        for name, value in [
            ("start_loc", loc),
            ("start_scale", root.scale),
            ("start_basis", root.basis),
            ("start_core", root.core),
            ("shift_multiplier", start.shift_multiplier),
        ]:
            self.register_buffer(name, value.detach().to(loc).clone())
        self.shift = PyroParam(torch.zeros_like(loc))
        self.scale_diag = PyroParam(torch.ones_like(loc), constraints.softplus_positive)
        if size <= DENSE_MAX:
            self.scale_tril = PyroParam(loc.new_zeros(size * (size - 1) // 2))
        else:
            rank = min(RANK, size)
            generator = torch.Generator().manual_seed(0)  # not the user's random stream
            left = torch.randn(size, rank, generator=generator, dtype=loc.dtype) / size**0.5
            self.scale_left = PyroParam(left.to(loc.device))  # T = diag + left right^T
            self.scale_right = PyroParam(loc.new_zeros(size, rank))

    def load_state_dict(
        self, state_dict: Mapping[str, Tensor], strict: bool = True, assign: bool = False
    ) -> object:
        r"""Loads parameters, also into a freshly built guide that has never been called.

        A fresh guide builds its parameters from the shapes in ``state_dict``; the model
        is traced at the first call, which checks that the latent dimension matches. Values
        that Pyro's param store holds under this guide's names are dropped, so that the
        loaded ones are used.

        Arguments:
            state_dict: A state dict from :meth:`state_dict` of a guide of the same model
                and flow configuration.
            strict: Whether keys must match exactly.
            assign: As in :meth:`torch.nn.Module.load_state_dict`.

        Returns:
            The missing and unexpected keys.
        """

        if "shift" not in self._pyro_params and "start_loc" in state_dict:
            self._build_parameters(_saved_start(state_dict))
        if not hasattr(self, "local_locs"):  # before set-up: local sites' values wait for it
            local = {k: v for k, v in state_dict.items() if k.startswith(_LOCAL_PREFIXES)}
            if local:
                self._pending_local = dict(local)
                state_dict = {k: v for k, v in state_dict.items() if k not in local}
        try:
            result = super().load_state_dict(state_dict, strict=strict, assign=assign)
        except RuntimeError as error:
            raise ValueError(
                f"This state dict does not fit this guide ({self.flow_config}): it was saved "
                "from a guide of another model or flow configuration. Build the guide with the "
                f"same model and options as the saved one.\n{error}"
            ) from error
        store = pyro.get_param_store()
        prefix = f"{self._pyro_name}."
        own = [f"{prefix}{name}" for name in _PARAMS]
        own += [name for name in store.keys() if name.startswith(f"{prefix}local_")]
        for fullname in own:
            if fullname in store:
                del store[fullname]
        return result

    # The posterior ------------------------------------------------------------------------

    def get_base_dist(self) -> dist.Distribution:
        r"""Returns the standard Normal over :math:`\epsilon`."""

        zeros = self.shift.new_zeros(self.latent_dim)
        return dist.Normal(zeros, 1.0).to_event(1)

    def _check_set_up(self) -> None:
        if "shift" not in self._pyro_params:
            raise ValueError(
                "This AutoFlowGuide has not been set up yet: call it (or take an SVI step) with "
                "the model's arguments first."
            )

    def _affine(self) -> tuple[Tensor, LinearScale]:
        # z = loc + S y with loc = mu_0 + S_0 (c * shift) and S = S_0 T, T learned.
        self._check_set_up()
        root = self._start_root()
        loc = self.start_loc + _apply_root(root, self.shift_multiplier * self.shift)
        speed = tril_speed(len(loc))
        if "scale_tril" in self._pyro_params:
            parts = {"tril": speed * self.scale_tril}
        else:
            parts = {"left": self.scale_left, "right": speed * self.scale_right}
        return loc, LinearScale(root, self.scale_diag, **parts)

    def _start_root(self) -> RootFactor:
        return root_factor(self.start_scale, self.start_basis, self.start_core)

    @property
    def loc(self) -> Tensor:
        r"""The location :math:`\mu` of the packed unconstrained latent (the base Gaussian's
        mean; see :attr:`locs` per site)."""

        return self._affine()[0]

    @property
    def scale(self) -> Tensor:
        r"""The marginal sds of the base Gaussian :math:`N(\mu, S S^\top)` on the packed
        unconstrained latent, :math:`\sqrt{\operatorname{diag}(S S^\top)}` (see
        :attr:`scales` per site)."""

        return self._affine()[1].variances().sqrt()

    @property
    def locs(self) -> SimpleNamespace:
        r"""The base Gaussian's mean per site, unconstrained, as ``AutoNormal``'s ``locs``:
        ``guide.locs.mu``, or ``getattr(guide.locs, "linear.weight")`` for a dotted name.

        ``AutoNormal``'s locations are its posterior's (unconstrained) means and medians.
        Here they are the mean of the Gaussian that the flow reshapes: the guide's own
        posterior is that Gaussian only where the flow is still the identity (at step 0).
        For the posterior use :meth:`median`, :meth:`quantiles` or draws.
        """

        return self._per_site("loc")

    @property
    def scales(self) -> SimpleNamespace:
        r"""The base Gaussian's marginal sds per site, unconstrained, as ``AutoNormal``'s
        ``scales`` (with the caveat of :attr:`locs`)."""

        return self._per_site("scale")

    def _per_site(self, what: str) -> SimpleNamespace:
        self._check_set_up()
        result = SimpleNamespace()
        for site, value in self._latent.unpack(getattr(self, what)):
            setattr(result, site["name"], value)
            _nest(result, site["name"].split("."), value)
        return result

    def get_transform(self, *args: object, **kwargs: object) -> Transform:
        r"""Returns the map :math:`\epsilon \mapsto \mu + S f(\epsilon)`.

        With :meth:`get_base_dist`, this is what
        :class:`~pyro.infer.reparam.NeuTraReparam` needs.
        """

        loc, scale = self._affine()
        return ComposedTransform(self._flow_transform(self.flow_params), _Linear(loc, scale))

    def get_posterior(self, *args: object, **kwargs: object) -> FlowPosterior:
        r"""Returns the distribution of the packed unconstrained latent :math:`z`."""

        flat = self.flow_params
        loc, scale = self._affine()
        transform = self._flow_transform(flat)
        stl_log_prob = None
        if self.stl:

            def stl_log_prob(z: Tensor, eps: Tensor) -> Tensor:
                detached = self._flow_transform(flat.detach())
                try:
                    return detached_log_prob(detached, loc.detach(), _detached(scale), z, eps)
                finally:
                    self._packing.bind(flat)

        return FlowPosterior(transform, loc, scale, stl_log_prob=stl_log_prob)

    def _flow_transform(self, flat: Tensor) -> Transform:
        if flat.shape != (self._packing.numel,):
            raise ValueError(
                f"Pyro's param store holds '{self._pyro_name}.flow_params' with "
                f"{flat.numel()} values, but this guide's flow has {self._packing.numel}: it "
                "belongs to another guide. Call pyro.clear_param_store() before building a new "
                "guide, or use pyro.settings.set(module_local_params=True)."
            )
        self._packing.bind(flat)
        return self.flow()

    # Sampling -------------------------------------------------------------------------------

    def _constrain(
        self, latent: Tensor, *args: object, **kwargs: object
    ) -> Iterator[tuple[str, Tensor, Tensor | float]]:
        model = _required(self._user_model) if self._latent.dependent else None
        return self._latent.constrain(latent, model, args, kwargs)

    def forward(self, *args: object, **kwargs: object) -> dict[str, Tensor]:
        r"""Draws every latent site, with the model's ``*args, **kwargs``.

        Returns:
            A dict from site name to its value in the constrained space.
        """

        if self.prototype_trace is None:
            self._setup_prototype(*args, **kwargs)
        else:
            self._follow_shapes(args, kwargs)
        latent = self.sample_latent(*args, **kwargs)
        plates = self._create_plates(*args, **kwargs)
        result = {}
        for name, value, log_density in self._constrain(latent, *args, **kwargs):
            event_dim = self.prototype_trace.nodes[name]["fn"].event_dim
            delta = dist.Delta(value, log_density=log_density, event_dim=event_dim)
            with ExitStack() as stack:
                for frame in self._cond_indep_stacks[name]:
                    stack.enter_context(plates[frame.name])
                result[name] = pyro.sample(name, delta)
        if self._local is not None:
            check_subsample(plates, self._local.sites)
            standardized = self._standardized(latent)
            result.update(self._local.draw(self, plates, standardized, self.stl, args, kwargs))
        return result

    def _standardized(self, latent: Tensor) -> Tensor | None:
        # The global draw as the structured local guide sees it: standardized by the start.
        if self.local != "structured":
            return None
        loc, scale = self._affine()
        return (latent - loc.detach()) / (self.start_scale * scale.diag).detach()

    def _create_plates(self, *args: object, **kwargs: object) -> dict:
        # As AutoGuide's, except that without create_plates the guide's plates subsample as
        # the model did at the last call whose arguments had new shapes or sizes (e.g.
        # subsample_size=None: the whole data, for diagnose and to_inference_data), not
        # always as at set-up.
        sizes = getattr(self, "_subsample_sizes", {})
        if self.master is not None or self.create_plates is not None or not sizes:
            return super()._create_plates(*args, **kwargs)
        self.plates = {}
        for name, frame in sorted(self._prototype_frames.items()):
            full = frame.full_size or frame.size
            size = sizes.get(name, frame.size)
            self.plates[name] = pyro.plate(name, full, dim=frame.dim, subsample_size=size)
        return self.plates

    def _follow_shapes(self, args: tuple, kwargs: dict) -> None:
        # Arguments of other shapes than at the last call: checked, and the plates follow
        # the model's subsample sizes for them.
        if _shapes(args, kwargs) != self._arg_shapes:
            self._check_latent_shapes(*args, **kwargs)

    def _check_latent_shapes(self, *args: object, **kwargs: object) -> None:
        # Data of another shape: fine unless the latent sites change shape with it.
        model = poutine.block(self.model, self._prototype_hide_fn)
        trace = poutine.block(poutine.trace(model).get_trace)(*args, **kwargs)
        self._subsample_sizes = {}
        for name, site in self.prototype_trace.iter_stochastic_nodes():
            if self._local is not None and name in self._local.sites:
                new = trace.nodes.get(name)
                _check_full_sizes(name, site, new)
                self._subsample_sizes |= {f.name: f.size for f in new["cond_indep_stack"]}
                continue
            new = trace.nodes[name]["value"].shape if name in trace.nodes else None
            if new != site["value"].shape:
                plates = [f"'{f.name}' ({f.size})" for f in site["cond_indep_stack"]]
                raise ValueError(
                    f"This guide was built for latent site '{name}' of shape "
                    f"{tuple(site['value'].shape)} (plates: {', '.join(plates) or 'none'}), "
                    f"but with these arguments the model gives it shape "
                    f"{None if new is None else tuple(new)}. A guide's latent sizes are fixed "
                    "when it is first called: build a new guide for data of another size, or "
                    "subsample with pyro.plate(..., subsample_size=...) and a local guide."
                )
        self._arg_shapes = _shapes(args, kwargs)

    # Summaries ------------------------------------------------------------------------------

    @torch.no_grad()
    def _quantile_draws(self) -> Tensor:
        generator = torch.Generator(device=self.start_loc.device).manual_seed(0)
        eps = torch.randn(
            (self.num_quantile_samples, self.latent_dim),
            generator=generator,
            dtype=self.start_loc.dtype,
            device=self.start_loc.device,
        )
        # In chunks of about 2**20 numbers: the flow's networks widen each draw k-fold, which
        # took 1.25 GB for 4,096 draws at D = 10,000 in one pass.
        transform = self.get_transform()
        rows = max(1, 2**20 // self.latent_dim)
        return torch.cat([transform(chunk) for chunk in eps.split(rows)])

    @torch.no_grad()
    def quantiles(
        self, quantiles: Sequence[float] | Tensor, *args: object, **kwargs: object
    ) -> dict[str, Tensor]:
        r"""Returns posterior quantiles of each latent site (Monte Carlo; see the class doc).

        Arguments:
            quantiles: Probabilities in :math:`[0, 1]`.
            args: The model's positional arguments.
            kwargs: The model's keyword arguments.

        Returns:
            A dict from site name to a tensor of shape ``(len(quantiles), *site_shape)``.
        """

        if self.prototype_trace is None:
            self._setup_prototype(*args, **kwargs)
        probs = torch.as_tensor(
            quantiles, dtype=self.start_loc.dtype, device=self.start_loc.device
        )
        if probs.dim() != 1 or not ((probs >= 0) & (probs <= 1)).all():
            raise ValueError(f"quantiles={quantiles!r}: give a list of probabilities in [0, 1].")
        draws = self._quantile_draws()
        result: dict[str, list[Tensor]] = {}
        with poutine.mask(mask=False):
            for latent in _columnwise_quantile(draws, probs):
                for name, value, _ in self._constrain(latent, *args, **kwargs):
                    result.setdefault(name, []).append(value)
            # Quantiles do not commute with a support that moves with other latents:
            # take those of the constrained draws themselves.
            elementwise = {
                name
                for name in self._dependent_sites
                if self.prototype_trace.nodes[name]["fn"].event_dim == 0
            }
            if elementwise:
                batch = draws.reshape(len(draws), *(1,) * self._latent.max_plate_nesting, -1)
                for name, value, _ in self._constrain(batch, *args, **kwargs):
                    if name in elementwise:
                        values = value.reshape(len(draws), -1)
                        site_shape = result[name][0].shape
                        q = _columnwise_quantile(values, probs)
                        result[name] = list(q.reshape(len(probs), *site_shape))
        quantiles = {name: torch.stack(values) for name, values in result.items()}
        if self._local is not None:
            standardized = self._standardized(draws)
            if self.local_guide is not None:
                self._follow_shapes(args, kwargs)  # the encoder's rows are those of args
            local = self._local.quantiles(self, probs, standardized, args, kwargs)
            quantiles.update(local)
        return quantiles

    @torch.no_grad()
    def median(self, *args: object, **kwargs: object) -> dict[str, Tensor]:
        r"""Returns the posterior median of each latent site (Monte Carlo; see the class doc).

        Returns:
            A dict from site name to its median, in the constrained space.
        """

        return {name: q[0] for name, q in self.quantiles([0.5], *args, **kwargs).items()}


def _nest(namespace: SimpleNamespace, parts: list[str], value: Tensor) -> None:
    # "linear.weight" is also reachable as namespace.linear.weight (AutoNormal's deep_setattr).
    for part in parts[:-1]:
        inner = getattr(namespace, part, None)
        if not isinstance(inner, SimpleNamespace):
            inner = SimpleNamespace()
            setattr(namespace, part, inner)
        namespace = inner
    setattr(namespace, parts[-1], value)


_LOCAL_PREFIXES = ("local_locs.", "local_scales.", "local_weights.")
_PARAMS = ("shift", "scale_diag", "scale_tril", "scale_left", "scale_right", "flow_params")


class _Linear(Transform):
    r"""The transformation :math:`y \mapsto \mu + S y` of vectors."""

    domain = constraints.real_vector
    codomain = constraints.real_vector
    bijective = True

    def __init__(self, loc: Tensor, scale: LinearScale) -> None:
        super().__init__()
        self.loc, self.scale = loc, scale

    def _call(self, y: Tensor) -> Tensor:
        return self.loc + self.scale.apply(y)

    def _inverse(self, z: Tensor) -> Tensor:
        return self.scale.solve(z - self.loc)

    def log_abs_det_jacobian(self, y: Tensor, z: Tensor) -> Tensor:
        return self.scale.log_abs_det().expand(y.shape[:-1])


def _apply_root(root: RootFactor, u: Tensor) -> Tensor:
    return LinearScale(root, torch.ones_like(u)).apply(u.unsqueeze(0)).squeeze(0)


def _detached(scale: LinearScale) -> LinearScale:
    detach = {
        key: None if value is None else value.detach()
        for key, value in vars(scale).items()
        if key != "root"
    }
    return LinearScale(scale.root, **detach)


def _saved_start(state_dict: Mapping[str, Tensor]) -> Start:
    # The start of a state dict, to build a fresh guide's parameters before loading them.
    names = ("start_loc", "start_scale", "start_basis", "start_core", "shift_multiplier")
    tensors = [state_dict.get(name) for name in names]
    if not all(isinstance(t, Tensor) for t in tensors) or tensors[0].dim() != 1:
        raise ValueError(
            f"This state dict lacks the start of an AutoFlowGuide ({', '.join(names)}): load "
            "a state dict saved from an AutoFlowGuide of this version."
        )
    loc, scale, basis, core, multiplier = (t.clone() for t in tensors)
    return Start(loc, root_factor(scale, basis, core), multiplier, "loaded")


def _check_full_sizes(name: str, site: dict, new: dict | None) -> None:
    # A local site's parameters have its plates' full sizes, fixed at set-up.
    before = {f.name: f.full_size or f.size for f in site["cond_indep_stack"]}
    after = {} if new is None else {f.name: f.full_size or f.size for f in new["cond_indep_stack"]}
    for plate, size in before.items():
        if after.get(plate) != size:
            raise ValueError(
                f"Plate {plate!r} of local latent site {name!r} had {size} elements when this "
                f"guide was set up, and has {after.get(plate)} with these arguments: the guide "
                "holds a location and scale per element, fixed at set-up. Build a new guide "
                "for data of another size."
            )


def _shapes(args: tuple, kwargs: dict) -> tuple:
    # What can set a latent site's size: tensor shapes, and ints, bools and strings by value
    # (floats are left out, so that e.g. an annealing factor does not re-trace the model).
    def shape(value: object) -> object:
        if isinstance(value, Tensor) or hasattr(value, "__array__"):
            return tuple(getattr(value, "shape", ()))
        if isinstance(value, int | str) or value is None:
            return value
        if isinstance(value, list | tuple):
            return tuple(map(shape, value))
        if isinstance(value, Mapping):
            return tuple((k, shape(v)) for k, v in value.items())
        return type(value).__name__

    return tuple(map(shape, args)), tuple((k, shape(v)) for k, v in sorted(kwargs.items()))


def _columnwise_quantile(draws: Tensor, probs: Tensor) -> Tensor:
    chunk = max(1, 2**24 // len(draws))  # torch.quantile takes at most 2**24 elements
    columns = [
        torch.quantile(draws[:, i : i + chunk], probs, dim=0)
        for i in range(0, draws.shape[-1], chunk)
    ]
    return torch.cat(columns, dim=-1)
