"""Per-sample random augmentation applied to a whole batch at once.

torchvision's transforms draw one set of random parameters per call, so per-sample
randomness would need one call per image (a Python loop per batch). Here each
augmentation draws its parameters per sample from the run's generator and all of them
are composed into one affine matrix per image, applied with a single
``F.affine_grid``/``F.grid_sample``. Zero fill outside the image (black), as torchvision's
``RandomCrop(padding=p)`` and ``RandomRotation`` do. Training only; reproducible from the seed.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from cnnbench.registry import Registry

AUGMENTATIONS = Registry("augmentation")

# An augmentation fills per-sample affine parameters: it gets a dict of tensors of shape (N,)
# (angle in radians, tx, ty in pixels, flip as ±1, scale) and modifies them in place.


@AUGMENTATIONS.register(interpolation="nearest")
def random_crop(params: dict, g: torch.Generator, size: int, padding: int = 4) -> None:
    """Random crop after zero-padding by ``padding`` px: an integer shift in [-padding, padding]."""
    n = params["tx"].shape[0]
    params["tx"] += torch.randint(-padding, padding + 1, (n,), generator=g).float()
    params["ty"] += torch.randint(-padding, padding + 1, (n,), generator=g).float()


@AUGMENTATIONS.register(interpolation="nearest")
def horizontal_flip(params: dict, g: torch.Generator, size: int, p: float = 0.5) -> None:
    """Mirror left-right with probability ``p`` (changes the meaning of some digits: avoid on digits)."""
    n = params["flip"].shape[0]
    params["flip"] *= torch.where(torch.rand(n, generator=g) < p, -1.0, 1.0)


@AUGMENTATIONS.register(interpolation="bilinear")
def rotation(params: dict, g: torch.Generator, size: int, degrees: float = 15.0) -> None:
    """Rotate by an angle drawn uniformly from [-degrees, degrees]."""
    n = params["angle"].shape[0]
    params["angle"] += (torch.rand(n, generator=g) * 2 - 1) * math.radians(degrees)


class BatchAugment:
    """Compose a list of augmentation specs (names or ``{name: kwargs}``) into one batched affine warp."""

    def __init__(self, specs: list, image_size: int):
        self.steps = []
        nearest = True
        for spec in specs:
            name, kwargs = (spec, {}) if isinstance(spec, str) else next(iter(spec.items()))
            fn = AUGMENTATIONS.get(name)
            self.steps.append((fn, dict(kwargs or {})))
            nearest &= AUGMENTATIONS.info(name)["interpolation"] == "nearest"
        self.mode = "nearest" if nearest else "bilinear"
        self.size = image_size

    def __bool__(self) -> bool:
        return bool(self.steps)

    def __call__(self, x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        """``x``: float batch N×C×H×W in [0, 1] (before normalization). Parameters are drawn on the CPU."""
        if not self.steps:
            return x
        n = x.shape[0]
        params = {k: torch.zeros(n) for k in ("angle", "tx", "ty")}
        params["flip"] = torch.ones(n)
        for fn, kwargs in self.steps:
            fn(params, g, self.size, **kwargs)
        h, w = x.shape[-2:]
        cos, sin = params["angle"].cos(), params["angle"].sin()
        theta = torch.zeros(n, 2, 3)
        # output pixel → input pixel, in normalized coordinates ([-1, 1] spans the image)
        theta[:, 0, 0] = cos * params["flip"]
        theta[:, 0, 1] = -sin * h / w
        theta[:, 1, 0] = sin * w / h * params["flip"]
        theta[:, 1, 1] = cos
        theta[:, 0, 2] = -params["tx"] * 2 / w
        theta[:, 1, 2] = -params["ty"] * 2 / h
        theta = theta.to(device=x.device, dtype=x.dtype)
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        return F.grid_sample(x, grid, mode=self.mode, padding_mode="zeros", align_corners=False)
