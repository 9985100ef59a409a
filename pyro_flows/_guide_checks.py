r"""Argument and model checks of :class:`~pyro_flows.AutoFlowGuide`, with errors that say
what to do."""

from __future__ import annotations

import inspect
from collections.abc import Callable

import pyro

from ._data_checks import MASK_ADVICE, DataError, nonfinite_arguments
from .flows import FLOWS
from .guard import is_invalid_value_error
from .supports import site_bijection

__all__ = ["check_flow", "check_subsampled_latents", "raise_helpful_setup_error"]


def check_flow(flow: object, options: dict[str, object]) -> None:
    if isinstance(flow, str):
        if flow not in FLOWS:
            raise ValueError(
                f"Unknown flow {flow!r}: use one of {sorted(FLOWS)} or pass a callable that "
                "returns a flow for a given number of features."
            )
        factory = FLOWS[flow]
        parameters = inspect.signature(factory).parameters
        valid = sorted(set(parameters) - {"features"})
        unknown = sorted(set(options) - set(valid))
        if unknown:
            raise TypeError(f"Unknown option(s) {unknown} for flow {flow!r}; valid: {valid}.")
        try:
            factory(2, **options)  # validates values before any model is traced
        except TypeError as error:
            raise TypeError(
                f"Flow {flow!r} cannot be built with options {options} ({error}). Use zuko's "
                "types, e.g. hidden_features=(64, 64), transforms=3, bins=8, "
                "activation=torch.nn.ELU."
            ) from error
    elif callable(flow):
        if options:
            raise TypeError(
                f"Options {sorted(options)} apply to named flows only; configure your flow "
                "callable instead, e.g. flow=functools.partial(my_flow, ...)."
            )
    else:
        raise TypeError(f"flow must be a name in {sorted(FLOWS)} or a callable, got {flow!r}.")


def check_subsampled_latents(trace: pyro.poutine.Trace) -> None:
    for name, site in trace.iter_stochastic_nodes():
        for frame in site["cond_indep_stack"]:
            if frame.full_size is not None and frame.size != frame.full_size:
                raise ValueError(
                    f"Latent site '{name}' is inside plate '{frame.name}', which is subsampled "
                    f"({frame.size} of {frame.full_size}). A single flow over all latents "
                    "would share its parameters across mini-batches. Split the guide: "
                    "guide = AutoGuideList(model, create_plates=...); "
                    f"guide.append(AutoFlowGuide(poutine.block(model, hide=['{name}']))); "
                    f"guide.append(AutoNormal(poutine.block(model, expose=['{name}'])))."
                )


def raise_helpful_setup_error(
    trace: pyro.poutine.Trace | None,
    error: Exception,
    model: Callable[..., object],
    args: tuple,
    kwargs: dict,
) -> None:
    if trace is None:
        suspects = nonfinite_arguments(model, args, kwargs)
        if is_invalid_value_error(error) and suspects:
            raise DataError(
                f"{error}\nThe model's {', '.join(suspects)}: NaN or infinite inputs make "
                f"distribution arguments invalid. {MASK_ADVICE}"
            ) from error
        raise error
    latent = list(trace.iter_stochastic_nodes())
    for name, site in latent:
        if site["fn"].support.is_discrete:
            raise ValueError(
                f"Latent site '{name}' is discrete ({type(site['fn']).__name__}); a flow guide "
                "covers continuous latents only. Enumerate it out (infer={'enumerate': "
                "'parallel'} with TraceEnum_ELBO, hiding it from this guide with "
                f"poutine.block(model, hide=['{name}'])), or combine guides with "
                "AutoGuideList (e.g. AutoDiscreteParallel for the discrete sites)."
            ) from error
    if not latent:
        raise ValueError(
            "The model has no latent sample sites (every pyro.sample is observed), so there "
            "is nothing for a guide to fit. Use an empty guide, e.g. `def guide(*args): pass`."
        ) from error
    if all(site["value"].numel() == 0 for _, site in latent):
        shapes = {name: tuple(site["value"].shape) for name, site in latent}
        raise ValueError(
            f"The model's latent sites have no elements (shapes {shapes}), so there is nothing "
            "for a guide to fit: check the sizes of the plates and data that set these shapes."
        ) from error
    for name, site in latent:
        try:
            site_bijection(site["fn"].support)
        except NotImplementedError:
            raise NotImplementedError(
                f"Latent site '{name}' has support {site['fn'].support}, which neither torch's "
                "biject_to nor pyro_flows.supports.site_bijection maps from the real line. "
                "Reparametrize the site (e.g. sample "
                "an unconstrained value and transform it) or register a bijection with "
                "torch.distributions.biject_to.register."
            ) from error
    raise error
