r"""Names the dimensions of model sites after the plates that create them."""

__all__ = ["plate_dims"]

from collections.abc import Mapping

from ._sites import Site

RESERVED = frozenset({"chain", "draw"})


def plate_dims(sites: Mapping[str, Site]) -> dict[str, list[str | None]]:
    r"""Returns ArviZ ``dims`` naming each site's plate dimensions after their plates.

    A plate of ``dim=d`` sits at position ``d`` counted from the right of the site's batch
    shape; it names that dimension when the sizes agree. Other dimensions (event dimensions,
    size-one broadcast dimensions) are left as :py:`None`, which ArviZ names
    ``<site>_dim_<i>``. A plate named ``chain`` or ``draw`` is renamed ``<plate>_plate``, as
    ArviZ uses these names for the sample dimensions.

    Arguments:
        sites: The model's sites for a single draw.

    Returns:
        A mapping from site names to dimension names, for the sites with a named dimension.

    Example:
        >>> import torch
        >>> import pyro.distributions as dist
        >>> from pyro_flows._sites import Site
        >>> plates = (("school", -1, 8),)
        >>> theta = Site("latent", torch.Size([8]), 0, plates, dist.Normal(0, 1), None)
        >>> plate_dims({"theta": theta})
        {'theta': ['school']}
    """
    dims = {}
    for name, site in sites.items():
        names: list[str | None] = [None] * len(site.shape)
        batch_ndim = len(site.shape) - site.event_dim
        for plate, dim, size in site.plates:
            position = batch_ndim + dim
            if 0 <= position < batch_ndim and site.shape[position] == size:
                names[position] = f"{plate}_plate" if plate in RESERVED else plate
        if any(names):
            dims[name] = names
    return dims
