"""One site of a codebook model holding a codebook or an SAE, and the SAE size that matches
it."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from torch import Tensor

from ..errors import CodebookError


class _SiteView:
    """``model`` seen with one site, holding ``module`` (the codebook or an SAE); enter
    :meth:`active` to bypass the other sites meanwhile. Has what the standard evaluation,
    topic-code ranking and steering read of a ``CodebookModel``."""

    def __init__(self, model: Any, site: str, module: Any) -> None:
        self.model, self.name, self.module = model, site, module

    def __getattr__(self, name: str) -> Any:
        return getattr(self.model, name)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.model(*args, **kwargs)

    @property
    def site_names(self) -> list[str]:
        return [self.name]

    @property
    def sites(self) -> dict[str, Any]:
        return {self.name: self.module}

    def site(self, name: str) -> Any:
        if name != self.name:
            raise CodebookError(f"no site {name!r} in this comparison (only {self.name})")
        return self.module

    def codes(self) -> dict[str, Tensor]:
        if self.module.last_codes is None:
            raise CodebookError("no codes yet: run a forward first")
        return {self.name: self.module.last_codes}

    @contextlib.contextmanager
    def active(self) -> Iterator[_SiteView]:
        from ..model_config import _key

        m = self.model
        key = _key(self.name)
        old = m.codebooks[key]
        others = [ly for n, ly in m.sites.items() if n != self.name]
        was = [ly.bypass for ly in others]
        enabled = m.enabled
        m.codebooks[key] = self.module
        for ly in others:
            ly.bypass = True
        m.enable_codebooks()
        try:
            yield self
        finally:
            m.codebooks[key] = old
            for ly, b in zip(others, was, strict=True):
                ly.bypass = b
            if not enabled:
                m.disable_codebooks()


def matched_sizes(layer: Any) -> tuple[int, int]:
    """The SAE size matching a codebook layer: (latents, k) = (G * C, G * k)."""
    c = layer.config
    return c.groups * c.num_codes, c.groups * c.k


def check_sae(sae: Any, layer: Any, site: str) -> None:
    """Refuse an SAE whose width, latents or k differ from the site's codebook."""
    n, k = matched_sizes(layer)
    got = (int(sae.d_in), int(sae.num_latents), int(sae.cfg.k))
    want = (int(layer.config.dim), n, k)
    if got != want:
        raise CodebookError(
            f"SAE sizes do not match the codebook at {site}: the SAE has width {got[0]}, "
            f"{got[1]} latents, k={got[2]}; the codebook needs width {want[0]}, {n} latents "
            f"(codes over all groups), k={k} (codes per token over all groups); train a "
            "matched one (leave out --sae)")
