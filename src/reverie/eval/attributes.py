"""An attribute classifier for ``shapes`` images: which objects are drawn, and where, read from pixels.

It is a small fully convolutional detector (CenterNet-style, Zhou et al. 2019, "Objects as Points"):
on an 8x8 grid over a 32x32 image (larger images are area-resized to 32x32 first) every cell predicts
an objectness, the offset of the nearby object's center from the cell's center, and that object's
color and shape. ``predict`` returns, per image, the number of objects and, for up to three of them
sorted by ``x + y`` of their centers (top-left first), color, shape and center.

Targets: each center is splatted bilinearly onto its 2x2 nearest cell centers (weights sum to 1), the
objectness target is that splat and the color / shape / offset losses are weighted by it, so targets
move continuously with the center. (A one-hot "cell holding the center" target jumps at cell edges;
the network then hedges there and missed about 1 % of objects whose centers sat near an edge.)
Decoding keeps the 3x3 local maxima of the objectness whose 3x3 neighbourhood holds more than 0.5 of
the center probability. Two centers are at least r0 + r1 + 0.03 >= 0.26 of the image side (about
two cells) apart, since ``shapes`` never overlaps objects, so one object gives one maximum.

Why a detector rather than global "object slot" heads: the color / shape heads are 1x1 convolutions
shared by every cell, so what is learnt about a star at one place holds everywhere; a CNN with global
slot heads (slots sorted by x + y) reached 99 % shape accuracy only after about twice the training.

Relations are read from the decoded centers, on the dominant axis (``relation_between``): a
two-object ``shapes`` scene always has one axis dominating the other by >= 2.2x, so the decoded
relation has a wide margin; for a generated image it is what the layout most looks like.

Trained on the generator's own labels, fresh samples every step, with mild pixel noise and color gain
jitter so that it tolerates a diffusion model's imperfect pixels. ``load_classifier()`` loads the
shipped one from ``reverie/assets/shapes-classifier`` (``config.json`` + ``model.safetensors``);
``benchmarks/train_shapes_classifier.py`` retrains it.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .. import modeldir
from ..data import collate
from ..data.shapes import COLORS, SHAPES, ShapesDataset

DEFAULT_PATH = Path(__file__).resolve().parent.parent / "assets" / "shapes-classifier"
MAX_OBJECTS = 3  # objects returned per image (a shapes scene has at most 3)


@dataclass
class ClassifierConfig:
    """Architecture and vocabulary; stored in ``config.json`` so a vocabulary change is caught at load."""

    channels: tuple[int, ...] = (32, 48, 96)
    resolution: int = 32
    colors: tuple[str, ...] = tuple(COLORS)
    shapes: tuple[str, ...] = SHAPES


def _conv(c_in: int, c_out: int, stride: int = 1, dilation: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_out, 3, stride=stride, padding=dilation, dilation=dilation, bias=False),
            nn.BatchNorm2d(c_out), nn.ReLU()]


class AttributeClassifier(nn.Module):
    """images ``[B, 3, H, W]`` in [-1, 1] -> per-cell outputs ``[B, 1 + 2 + colors + shapes, G, G]``
    (objectness logit, center offset from the cell center in cells, color and shape logits) on a
    G = resolution / 4 grid."""

    def __init__(self, config: ClassifierConfig | None = None):
        super().__init__()
        self.config = config = config or ClassifierConfig()
        c1, c2, c3 = config.channels
        # 32 -> 16 -> 8; the last, dilated conv sees ~37 px: all of the largest shape and its neighbours.
        self.features = nn.Sequential(
            *_conv(3, c1), *_conv(c1, c2, stride=2), *_conv(c2, c2),
            *_conv(c2, c3, stride=2), *_conv(c3, c3), *_conv(c3, c3, dilation=2),
        )
        self.head = nn.Conv2d(c3, 3 + len(config.colors) + len(config.shapes), 1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(resize(images, self.config.resolution)))

    def split(self, logits: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """``objectness [B, G, G]``, ``offset [B, 2, G, G]``, ``color`` and ``shape`` logits ``[B, n, G, G]``."""
        sizes = [1, 2, len(self.config.colors), len(self.config.shapes)]
        objectness, offset, color, shape = logits.split(sizes, dim=1)
        return objectness[:, 0], offset, color, shape

    @torch.no_grad()
    def predict(self, images: torch.Tensor, batch_size: int = 256) -> dict[str, torch.Tensor]:
        """``count [B]`` (objects found), and for up to 3 of them sorted by ``x + y``: ``color``, ``shape``
        ``[B, 3]`` (vocabulary indices, -1 where none) and ``center [B, 3, 2]`` (x right, y down, image fractions)."""
        was_training = self.training
        self.eval()
        device = next(self.parameters()).device
        logits = torch.cat([self(chunk.to(device)).cpu() for chunk in images.split(batch_size)])
        self.train(was_training)
        return decode(*self.split(logits))


def _window_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum over each cell's 3x3 neighbourhood of ``[B, C, G, G]``."""
    return F.avg_pool2d(t, 3, stride=1, padding=1, divisor_override=1)


def decode(objectness, offset, color, shape) -> dict[str, torch.Tensor]:
    """Objects at the local maxima (3x3) of the objectness whose neighbourhood holds more than 0.5 of the
    center probability (a center near a cell corner spreads it over up to four cells); center, color and
    shape are read at the maximum. Sorted by ``x + y``, at most ``MAX_OBJECTS``."""
    g = objectness.shape[-1]
    mass = _window_sum(objectness.sigmoid()[:, None])[:, 0]
    # Maxima of the logits, not of the probabilities: sigmoid saturates to exact ties at 1.0.
    peaks = (objectness == F.max_pool2d(objectness[:, None], 3, 1, 1)[:, 0]) & (mass > 0.5)
    rows, cols = torch.meshgrid(torch.arange(g), torch.arange(g), indexing="ij")
    xy = (torch.stack([cols, rows]) + 0.5 + offset) / g  # [B, 2, G, G]
    order = xy.sum(1).masked_fill(~peaks, float("inf")).flatten(1).argsort(dim=1)[:, :MAX_OBJECTS]
    found = peaks.flatten(1).gather(1, order)
    pick = lambda t: t.flatten(-2).gather(-1, order)  # noqa: E731  ([B, G, G] -> [B, MAX_OBJECTS])
    center = torch.stack([pick(xy[:, 0]), pick(xy[:, 1])], -1).masked_fill(~found[..., None], -1.0)
    return {
        "count": peaks.flatten(1).sum(1),
        "color": pick(color.argmax(1)).masked_fill(~found, -1),
        "shape": pick(shape.argmax(1)).masked_fill(~found, -1),
        "center": center,
    }


def relation_between(a: torch.Tensor | tuple, b: torch.Tensor | tuple) -> int:
    """Index into RELATIONS of center ``a`` relative to center ``b`` on the dominant axis (x right, y down)."""
    dx, dy = float(a[0]) - float(b[0]), float(a[1]) - float(b[1])
    if abs(dx) >= abs(dy):
        return 0 if dx < 0 else 1
    return 2 if dy < 0 else 3


def resize(images: torch.Tensor, resolution: int) -> torch.Tensor:
    """Bring ``[B, 3, H, W]`` images to ``resolution`` (area averaging: a box filter, like the renderer)."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"expected RGB images [B, 3, H, W], got shape {tuple(images.shape)}")
    images = images.float()
    if images.shape[-2:] == (resolution, resolution):
        return images
    if images.shape[-1] % resolution == 0 and images.shape[-2] % resolution == 0:
        return F.adaptive_avg_pool2d(images, resolution)
    return F.interpolate(images, size=(resolution, resolution), mode="bilinear", antialias=True)


# ------------------------------------------------------------------------------------------------ training


def splat(centers: torch.Tensor, g: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Bilinear weights of centers ``[N, 2]`` (image fractions) on the 2x2 nearest cell centers of a g x g
    grid: ``rows, cols, weights`` each ``[N, 4]``, weights summing to 1. Targets then move continuously
    with the center, instead of jumping between cells at an edge."""
    u = centers * g - 0.5  # in cell-center coordinates
    low = u.floor()
    frac = u - low
    rows, cols, weights = [], [], []
    for dy in (0, 1):
        for dx in (0, 1):
            cols.append((low[:, 0] + dx).clamp(0, g - 1).long())
            rows.append((low[:, 1] + dy).clamp(0, g - 1).long())
            weights.append((frac[:, 0] if dx else 1 - frac[:, 0]) * (frac[:, 1] if dy else 1 - frac[:, 1]))
    return torch.stack(rows, 1), torch.stack(cols, 1), torch.stack(weights, 1)


def detection_loss(model: AttributeClassifier, logits: torch.Tensor, batch: dict) -> torch.Tensor:
    """Objectness BCE against the splatted centers on every cell; color / shape cross-entropy and center
    offset L1 on each object's four splat cells, weighted by the splat weights."""
    objectness, offset, color, shape = model.split(logits)
    g = objectness.shape[-1]
    objects = batch["objects"]
    b_idx, k_idx = (objects["shape"] >= 0).nonzero(as_tuple=True)
    centers = objects["center"][b_idx, k_idx]
    rows, cols, weights = splat(centers, g)
    b4 = b_idx[:, None].expand_as(rows)
    target = torch.zeros_like(objectness).index_put_((b4, rows, cols), weights, accumulate=True)
    loss = F.binary_cross_entropy_with_logits(objectness, target, reduction="sum") / len(b_idx)
    w = weights.flatten() / len(b_idx)
    for head, name in ((color, "color"), (shape, "shape")):
        labels = objects[name][b_idx, k_idx][:, None].expand_as(rows).flatten()
        ce = F.cross_entropy(head[b4.flatten(), :, rows.flatten(), cols.flatten()], labels, reduction="none")
        loss = loss + (w * ce).sum()
    # Offset target: the center relative to each splat cell's center, in cells.
    cell_xy = torch.stack([cols, rows], -1) + 0.5
    error = offset.permute(0, 2, 3, 1)[b4, rows, cols] - (centers[:, None] * g - cell_xy)
    return loss + (w * error.abs().sum(-1).flatten()).sum()


def _augment(images: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Mild pixel noise and per-channel gain jitter: diffusion samples are never exact renders. The gain
    stays within +-4 %, far below the spacing of the named colors."""
    b = images.shape[0]
    gain = 1 + 0.04 * (2 * torch.rand(b, 3, 1, 1, generator=g) - 1)
    noise_std = 0.08 * torch.rand(b, 1, 1, 1, generator=g)
    return ((images + 1) * gain - 1 + noise_std * torch.randn(images.shape, generator=g)).clamp(-1, 1)


@dataclass
class TrainSettings:
    steps: int = 300
    batch_size: int = 128
    lr: float = 3e-3
    weight_decay: float = 1e-4
    seed: int = 0
    data_seed: int = 1000


def train_classifier(settings: TrainSettings | None = None, config: ClassifierConfig | None = None,
                     log_every: int = 50) -> AttributeClassifier:
    """Train on fresh ``shapes`` samples (1-3 objects; item indices ``step * batch + k`` of dataset seed
    ``data_seed``), AdamW with a one-cycle learning rate; deterministic on CPU for a given thread count."""
    settings, config = settings or TrainSettings(), config or ClassifierConfig()
    torch.manual_seed(settings.seed)
    model = AttributeClassifier(config)
    data = ShapesDataset(resolution=config.resolution, min_objects=1, max_objects=3, seed=settings.data_seed)
    opt = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, settings.lr, total_steps=settings.steps, pct_start=0.15)
    g = torch.Generator().manual_seed(settings.seed)
    start = time.time()
    for step in range(settings.steps):
        batch = collate([data[i] for i in range(step * settings.batch_size, (step + 1) * settings.batch_size)])
        loss = detection_loss(model, model(_augment(batch["image"], g)), batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if log_every and (step % log_every == 0 or step == settings.steps - 1):
            print(f"step {step:5d}  loss {loss.item():.4f}  {time.time() - start:6.1f}s", flush=True)
    return model.eval()


def _match_truth(centers: torch.Tensor, found: torch.Tensor, truth: torch.Tensor) -> list[int | None]:
    """Detection index of each true center (the nearest one within 0.1 of the image side), or None."""
    matches = []
    for c in truth:
        dist = (centers - c).norm(dim=-1).masked_fill(~found, float("inf"))
        j = int(dist.argmin())
        matches.append(j if dist[j] < 0.1 else None)
    return matches


@torch.no_grad()
def classifier_accuracy(model: AttributeClassifier, num_images: int = 2000, seed: int = 12345,
                        resolution: int = 32, max_objects: int = 3) -> dict[str, float]:
    """Accuracy on real ``shapes`` images of dataset seed ``seed``: ``color`` / ``shape`` over all objects
    (a missed object is wrong), ``relation`` over all captionable object pairs, ``count`` over images."""
    data = ShapesDataset(resolution=resolution, min_objects=1, max_objects=max_objects, seed=seed)
    batch = collate([data[i] for i in range(num_images)])
    pred = model.predict(batch["image"])
    hits = {"color": [], "shape": [], "relation": []}
    for n in range(num_images):
        count, objects = int(batch["num_objects"][n]), batch["objects"]
        found = pred["color"][n] >= 0
        match = _match_truth(pred["center"][n], found, objects["center"][n, :count])
        for name in ("color", "shape"):
            hits[name] += [m is not None and int(pred[name][n, m]) == int(objects[name][n, i])
                           for i, m in enumerate(match)]
        for i in range(count):
            for j in range(i + 1, count):
                rel = int(batch["relations"][n, i, j])
                if rel >= 0:
                    ok = None not in (match[i], match[j]) and match[i] != match[j]
                    hits["relation"].append(ok and relation_between(
                        pred["center"][n, match[i]], pred["center"][n, match[j]]) == rel)
    result = {name: sum(v) / len(v) for name, v in hits.items()}
    result["count"] = (pred["count"] == batch["num_objects"]).float().mean().item()
    return {**result, "num_images": num_images}


# ---------------------------------------------------------------------------------------------- save / load


def save_classifier(model: AttributeClassifier, path: str | Path, extra: dict | None = None) -> Path:
    """A model directory of kind ``classifier``: architecture and vocabulary, ``extra`` notes, the weights."""
    return modeldir.write(path, "classifier", {"network": asdict(model.config), **(extra or {})},
                          {"model": model.state_dict()})


def load_classifier(path: str | Path | None = None, device: str = "cpu") -> AttributeClassifier:
    """Load a saved classifier (default: the shipped one); checks kind, vocabulary and tensor names."""
    found = modeldir.read(Path(path) if path is not None else DEFAULT_PATH, kind="classifier")
    config = ClassifierConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in found.config["network"].items()})
    if config.colors != tuple(COLORS) or config.shapes != SHAPES:
        raise ValueError(f"{found.path}: classifier vocabulary does not match reverie.data.shapes; retrain it")
    model = AttributeClassifier(config)
    modeldir.load_module_weights(model, found.load_weights(use_ema=False), source=str(found.weights_file(False)))
    return model.to(device).eval()
