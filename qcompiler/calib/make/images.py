"""Images (jpg / png / bmp) -> feeds of an image model input.

For every image, in this order:

1. decode with Pillow, apply the EXIF orientation, convert to RGB (3 channels), L (1) or RGBA (4) — the
   channel count of the model input;
2. resize to the input's H×W (read from the model; ``--size H,W`` when they are dynamic) with ``--interp``
   (Pillow's filter, bilinear by default) and ``--resize``:

   * ``stretch`` (default): straight to H×W, the aspect ratio is not kept;
   * ``center-crop``: scale so that the image covers (H / crop_pct)×(W / crop_pct), then cut the centered H×W
     (``--crop-pct 0.875`` is the usual ImageNet "resize 256, crop 224");
   * ``letterbox``: scale to fit inside H×W keeping the aspect ratio, centered on a canvas of ``--pad-value``;
3. to float32 ``[H, W, C]``; ``--bgr`` reverses the first three channels;
4. ``x * scale``, then ``(x - mean) / std`` per channel (in the model's channel order, i.e. after ``--bgr``);
5. NCHW / NHWC from the input shape (``--layout`` when the shape does not tell), cast to the input dtype.

Integer (e.g. uint8) inputs get the pixels as they are: scale / mean / std are refused for them.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from qcompiler.calib.feeds import InputSig
from qcompiler.calib.make.samples import Arrays, Item, RawSource, batch_size
from qcompiler.core.errors import UserError

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp")
RESIZE_MODES = ("stretch", "center-crop", "letterbox")
INTERPOLATIONS = {"nearest": Image.Resampling.NEAREST, "bilinear": Image.Resampling.BILINEAR,
                  "bicubic": Image.Resampling.BICUBIC, "lanczos": Image.Resampling.LANCZOS}
_MODES = {1: "L", 3: "RGB", 4: "RGBA"}


@dataclass(frozen=True)
class ImageOptions:
    """The ``qcompiler data`` image options (see the module docstring)."""

    size: tuple[int, int] | None = None
    layout: str | None = None  # "NCHW" or "NHWC"
    bgr: bool = False
    scale: float = 1.0
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    resize: str = "stretch"
    crop_pct: float = 1.0
    pad_value: int = 114
    interp: str = "bilinear"


@dataclass(frozen=True)
class ImagePlan:
    """Image options resolved against one model input."""

    sig: InputSig
    channels_first: bool
    channels: int
    height: int
    width: int
    opts: ImageOptions


def _fixed(d: int | str | None) -> int | None:
    return d if isinstance(d, int) and d > 0 else None


def plan_images(sig: InputSig, opts: ImageOptions) -> ImagePlan:
    """Layout, channels and H×W for ``sig`` (rank 4 with a batch axis, or rank 3)."""
    if not sig.known_rank or len(sig.shape) not in (3, 4):
        raise UserError(f"model input {sig.describe()} is not an image input (rank 3 or 4 expected)")
    d = [_fixed(x) for x in sig.shape[-3:]]
    first_ok, last_ok = d[0] in (1, 3, 4), d[2] in (1, 3, 4)
    if opts.layout is not None:
        layout = opts.layout.upper()
        if layout not in ("NCHW", "NHWC"):
            raise UserError(f"--layout must be NCHW or NHWC, got '{opts.layout}'")
        cf = layout == "NCHW"
        c = d[0] if cf else d[2]
        if c is not None and c not in (1, 3, 4):
            raise UserError(f"--layout {layout}: model input {sig.describe()} would have {c} channels "
                            "(1, 3 or 4 expected)")
    elif first_ok and not last_ok:
        cf = True
    elif last_ok and not first_ok:
        cf = False
    else:
        raise UserError(f"model input {sig.describe()}: cannot tell NCHW from NHWC; give --layout")
    channels = (d[0] if cf else d[2]) or 3
    hw = (d[1], d[2]) if cf else (d[0], d[1])
    if opts.size is not None:
        for name, got, want in (("H", opts.size[0], hw[0]), ("W", opts.size[1], hw[1])):
            if got <= 0:
                raise UserError(f"--size: {name} must be positive, got {got}")
            if want is not None and got != want:
                raise UserError(f"--size {opts.size[0]},{opts.size[1]}: model input {sig.describe()} needs "
                                f"{name}={want}")
        height, width = opts.size
    elif hw[0] is None or hw[1] is None:
        raise UserError(f"model input {sig.describe()} has a dynamic height / width; give --size H,W")
    else:
        height, width = hw[0], hw[1]
    if opts.resize not in RESIZE_MODES:
        raise UserError(f"--resize must be one of {', '.join(RESIZE_MODES)}, got '{opts.resize}'")
    if opts.interp not in INTERPOLATIONS:
        raise UserError(f"--interp must be one of {', '.join(INTERPOLATIONS)}, got '{opts.interp}'")
    if not 0 < opts.crop_pct <= 1:
        raise UserError(f"--crop-pct must be in (0, 1], got {opts.crop_pct}")
    for flag, vals in (("--mean", opts.mean), ("--std", opts.std)):
        if vals is not None and len(vals) not in (1, channels):
            raise UserError(f"{flag}: {len(vals)} values for an input with {channels} channels (give 1 or "
                            f"{channels})")
    if opts.std is not None and any(v == 0 for v in opts.std):
        raise UserError("--std: a standard deviation of 0")
    if sig.dtype.kind != "f" and (opts.scale != 1.0 or opts.mean is not None or opts.std is not None):
        raise UserError(f"model input {sig.describe()} is {sig.dtype}: it takes raw pixels; drop --scale / "
                        "--mean / --std")
    if sig.dtype.kind not in "fiu":
        raise UserError(f"model input {sig.describe()}: images cannot feed a {sig.dtype} input")
    return ImagePlan(sig, cf, channels, height, width, opts)


def _resize(im: Image.Image, plan: ImagePlan) -> Image.Image:
    o = plan.opts
    h, w = plan.height, plan.width
    flt = INTERPOLATIONS[o.interp]
    if o.resize == "stretch":
        return im.resize((w, h), flt)
    iw, ih = im.size
    if o.resize == "center-crop":
        s = max(h / ih, w / iw) / o.crop_pct
        nw, nh = max(w, round(iw * s)), max(h, round(ih * s))
        im = im.resize((nw, nh), flt)
        left, top = (nw - w) // 2, (nh - h) // 2
        return im.crop((left, top, left + w, top + h))
    s = min(h / ih, w / iw)  # letterbox
    nw, nh = min(w, max(1, round(iw * s))), min(h, max(1, round(ih * s)))
    canvas = Image.new(im.mode, (w, h), (o.pad_value,) * plan.channels if plan.channels > 1 else o.pad_value)
    canvas.paste(im.resize((nw, nh), flt), ((w - nw) // 2, (h - nh) // 2))
    return canvas


def load_image(path: Path, plan: ImagePlan) -> np.ndarray:
    """One image as the model sees it, without the batch axis: [C, H, W] or [H, W, C], the input dtype."""
    try:
        with Image.open(path) as src:
            src.load()
            im = ImageOps.exif_transpose(src) or src
            im = im.convert(_MODES[plan.channels])
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError, SyntaxError) as e:
        raise UserError(f"{path}: not a readable image ({type(e).__name__}: {e})") from None
    im = _resize(im, plan)
    o = plan.opts
    if plan.sig.dtype.kind != "f":
        x = np.asarray(im)
    else:
        x = np.asarray(im, dtype=np.float32)
    if x.ndim == 2:
        x = x[:, :, None]
    if o.bgr and plan.channels >= 3:
        x = np.concatenate([x[:, :, 2::-1], x[:, :, 3:]], axis=2)
    if plan.sig.dtype.kind == "f":
        x = x * np.float32(o.scale)
        if o.mean is not None:
            x = x - np.asarray(o.mean, dtype=np.float32)
        if o.std is not None:
            x = x / np.asarray(o.std, dtype=np.float32)
    if plan.channels_first:
        x = x.transpose(2, 0, 1)
    return np.ascontiguousarray(x).astype(plan.sig.dtype, copy=False)


def image_source(root: Path, files: list[Path], sigs: list[InputSig], opts: ImageOptions) -> RawSource:
    """Items for ``files`` (sorted, under ``root``) feeding the model's single input."""
    if len(sigs) != 1:
        raise UserError(f"{root}: a folder of images feeds a single-input model; this one has {len(sigs)} inputs "
                        f"({', '.join(s.name for s in sigs)}): give per-input .npy subfolders instead")
    plan = plan_images(sigs[0], opts)
    per = batch_size(sigs[0], 3) or 1
    name = sigs[0].name

    def loader(p: Path) -> Item:
        def load() -> Arrays:
            return {name: load_image(p, plan)}
        return Item(p.relative_to(root).as_posix() if p != root else p.name, load)

    log.info("images: %d files, %dx%d, %s, %d channels", len(files), plan.height, plan.width,
             "NCHW" if plan.channels_first else "NHWC", plan.channels)
    return RawSource("image", [loader(p) for p in files], f"{root} ({len(files)} images)", per_feed=per,
                     files=list(files))
