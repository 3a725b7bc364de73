"""Per-sample random augmentation of training batches, reproducible from the run's seed.

torchvision's transforms draw one set of random parameters per call, so per-sample randomness
would need one call per image (a Python loop per batch). So there are three kinds, applied in
this order whatever the order in the suite:

1. ``policy`` — torchvision.transforms.v2 policies (TrivialAugment, RandAugment, AutoAugment) on
   uint8 images, one call per image: their real cost shows in ``train_throughput``. torch's global
   RNG is forked and seeded from the run's augmentation generator, so dropout is not disturbed.
2. ``affine`` — crop (shift), flip, rotation, affine: each draws per-sample parameters and all are
   composed into one matrix per image, applied with a single ``F.affine_grid``/``F.grid_sample``,
   zero fill (black) outside the image as torchvision's ``RandomCrop(padding=p)`` does.
3. ``pixel`` — colour jitter and random erasing, vectorized over the batch.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from cnnbench.registry import Registry

AUGMENTATIONS = Registry("augmentation")

# An augmentation fills per-sample affine parameters: it gets a dict of tensors of shape (N,)
# (angle in radians, tx, ty in pixels, flip as ±1, scale) and modifies them in place.


@AUGMENTATIONS.register(kind="affine", interpolation="nearest")
def random_crop(params: dict, g: torch.Generator, size: int, padding: int = 4) -> None:
    """Random crop after zero-padding by ``padding`` px: an integer shift in [-padding, padding]."""
    n = params["tx"].shape[0]
    params["tx"] += torch.randint(-padding, padding + 1, (n,), generator=g).float()
    params["ty"] += torch.randint(-padding, padding + 1, (n,), generator=g).float()


@AUGMENTATIONS.register(kind="affine", interpolation="nearest")
def horizontal_flip(params: dict, g: torch.Generator, size: int, p: float = 0.5) -> None:
    """Mirror left-right with probability ``p`` (changes the meaning of some digits: avoid on digits)."""
    n = params["flip"].shape[0]
    params["flip"] *= torch.where(torch.rand(n, generator=g) < p, -1.0, 1.0)


@AUGMENTATIONS.register(kind="affine", interpolation="bilinear")
def rotation(params: dict, g: torch.Generator, size: int, degrees: float = 15.0) -> None:
    """Rotate by an angle drawn uniformly from [-degrees, degrees]."""
    n = params["angle"].shape[0]
    params["angle"] += (torch.rand(n, generator=g) * 2 - 1) * math.radians(degrees)


@AUGMENTATIONS.register(kind="affine", interpolation="bilinear")
def affine(params: dict, g: torch.Generator, size: int, degrees: float = 10.0, translate: float = 0.1,
           scale: tuple = (0.9, 1.1), shear: float = 0.0) -> None:
    """Random rotation (±degrees), translation (± translate·size px), scale and x-shear (±degrees)."""
    n = params["angle"].shape[0]
    params["angle"] += (torch.rand(n, generator=g) * 2 - 1) * math.radians(degrees)
    params["tx"] += (torch.rand(n, generator=g) * 2 - 1) * translate * size
    params["ty"] += (torch.rand(n, generator=g) * 2 - 1) * translate * size
    params["scale"] *= scale[0] + torch.rand(n, generator=g) * (scale[1] - scale[0])
    params["shear"] += (torch.rand(n, generator=g) * 2 - 1) * math.radians(shear)


@AUGMENTATIONS.register(kind="pixel")
def color_jitter(x: torch.Tensor, g: torch.Generator, brightness: float = 0.4, contrast: float = 0.4,
                 saturation: float = 0.4) -> torch.Tensor:
    """Per-sample brightness, contrast and (colour images) saturation factors in [1-v, 1+v]."""
    n, c = x.shape[:2]

    def factor(v: float) -> torch.Tensor:
        return (1 + (torch.rand(n, generator=g) * 2 - 1) * v).view(n, 1, 1, 1).to(x)

    x = x * factor(brightness)
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    x = (x - mean) * factor(contrast) + mean
    if c == 3:
        grey = (0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3])
        x = (x - grey) * factor(saturation) + grey
    return x.clamp_(0, 1)


@AUGMENTATIONS.register(kind="pixel")
def random_erasing(x: torch.Tensor, g: torch.Generator, p: float = 0.5, scale: tuple = (0.02, 0.33),
                   ratio: tuple = (0.3, 3.3)) -> torch.Tensor:
    """With probability ``p`` per image, zero a random rectangle of ``scale`` of its area (Zhong et al.)."""
    n, _, h, w = x.shape
    area = (scale[0] + torch.rand(n, generator=g) * (scale[1] - scale[0])) * h * w
    log_r = math.log(ratio[0]) + torch.rand(n, generator=g) * (math.log(ratio[1]) - math.log(ratio[0]))
    r = log_r.exp()
    eh = (area * r).sqrt().round().clamp(1, h)
    ew = (area / r).sqrt().round().clamp(1, w)
    top = (torch.rand(n, generator=g) * (h - eh + 1)).floor()
    left = (torch.rand(n, generator=g) * (w - ew + 1)).floor()
    apply = torch.rand(n, generator=g) < p
    rows, cols = torch.arange(h).view(1, h, 1), torch.arange(w).view(1, 1, w)
    box = ((rows >= top.view(n, 1, 1)) & (rows < (top + eh).view(n, 1, 1))
           & (cols >= left.view(n, 1, 1)) & (cols < (left + ew).view(n, 1, 1)) & apply.view(n, 1, 1))
    return x.masked_fill(box.unsqueeze(1).to(x.device), 0.0)


@AUGMENTATIONS.register(kind="policy")
def trivial_augment(num_magnitude_bins: int = 31):
    """TrivialAugment (wide): one random op at a random magnitude per image (torchvision v2)."""
    from torchvision.transforms import v2

    return v2.TrivialAugmentWide(num_magnitude_bins=num_magnitude_bins)


@AUGMENTATIONS.register(kind="policy")
def rand_augment(num_ops: int = 2, magnitude: int = 9):
    """RandAugment: ``num_ops`` random ops at a fixed ``magnitude`` per image (torchvision v2)."""
    from torchvision.transforms import v2

    return v2.RandAugment(num_ops=num_ops, magnitude=magnitude)


@AUGMENTATIONS.register(kind="policy")
def auto_augment(policy: str = "imagenet"):
    """AutoAugment with a learned policy: imagenet | cifar10 | svhn (torchvision v2)."""
    from torchvision.transforms import v2

    return v2.AutoAugment(policy=v2.AutoAugmentPolicy(policy))


class BatchAugment:
    """Compose a list of augmentation specs (names or ``{name: kwargs}``): policies, then one batched
    affine warp, then pixel ops (see the module docstring)."""

    def __init__(self, specs: list, image_size: int):
        self.policies, self.affine_steps, self.pixel_steps = [], [], []
        nearest = True
        for spec in specs:
            name, kwargs = (spec, {}) if isinstance(spec, str) else next(iter(spec.items()))
            fn, info, kwargs = AUGMENTATIONS.get(name), AUGMENTATIONS.info(name), dict(kwargs or {})
            if info["kind"] == "policy":
                self.policies.append(fn(**kwargs))
            elif info["kind"] == "affine":
                self.affine_steps.append((fn, kwargs))
                nearest &= info["interpolation"] == "nearest"
            else:
                self.pixel_steps.append((fn, kwargs))
        self.mode = "nearest" if nearest else "bilinear"
        self.size = image_size

    def __bool__(self) -> bool:
        return bool(self.policies or self.affine_steps or self.pixel_steps)

    def __call__(self, x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        """``x``: float batch N×C×H×W in [0, 1] (before normalization). Parameters are drawn on the CPU."""
        if self.policies:
            x = self._policies(x, g)
        if self.affine_steps:
            x = self._affine(x, g)
        for fn, kwargs in self.pixel_steps:
            x = fn(x, g, **kwargs)
        return x

    def _policies(self, x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        images = x.mul(255).round_().to(torch.uint8).cpu()
        seed = int(torch.randint(2**62, (1,), generator=g))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            for policy in self.policies:
                images = torch.stack([policy(img) for img in images])
        return images.to(x.device, x.dtype).div_(255)

    def _affine(self, x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        n = x.shape[0]
        params = {k: torch.zeros(n) for k in ("angle", "tx", "ty", "shear")}
        params["flip"] = torch.ones(n)
        params["scale"] = torch.ones(n)
        for fn, kwargs in self.affine_steps:
            fn(params, g, self.size, **kwargs)
        h, w = x.shape[-2:]
        cos, sin = params["angle"].cos(), params["angle"].sin()
        inv_scale, shear = 1.0 / params["scale"], params["shear"].tan()
        theta = torch.zeros(n, 2, 3)
        # output pixel → input pixel in normalized coordinates ([-1, 1] spans the image):
        # flip, then x-shear, then rotate, then 1/scale (zoom in for scale > 1)
        theta[:, 0, 0] = inv_scale * cos * params["flip"]
        theta[:, 0, 1] = inv_scale * (cos * shear - sin) * h / w
        theta[:, 1, 0] = inv_scale * sin * w / h * params["flip"]
        theta[:, 1, 1] = inv_scale * (sin * shear + cos)
        theta[:, 0, 2] = -params["tx"] * 2 / w
        theta[:, 1, 2] = -params["ty"] * 2 / h
        theta = theta.to(device=x.device, dtype=x.dtype)
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        return F.grid_sample(x, grid, mode=self.mode, padding_mode="zeros", align_corners=False)
