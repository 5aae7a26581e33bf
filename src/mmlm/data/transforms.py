"""Image preprocessing without torchvision, numerically equal to transformers' CLIPImageProcessor.

Three ways to bring an image to (3, S, S):

- ``resize_crop`` (CLIP): bicubic resize of the shortest side to S, then a centre crop S×S.
- ``pad_square`` (LLaVA-1.5): pad to a square with the mean colour (LLaVA's ``expand2square``),
  then resize to S×S.
- ``resize``: stretch to S×S.

Then ``(x / 255 - mean) / std``, channels first. The reference is transformers' PIL backend
(``CLIPImageProcessorPil``, ``LlavaImageProcessorPil`` with ``do_pad=True``); every step below
names the piece of it that it reproduces, bit for bit: the same PIL resize on the same RGB image,
the same size and crop arithmetic, and the same float dtypes in rescale and normalise.

Speed: HF converts each image PIL -> numpy -> PIL -> numpy and rescales and normalises it in
float64/float32 arithmetic. Here PIL resizes in C (optionally on a few threads: PIL and numpy
release the GIL) and each crop goes straight into the preallocated float32 batch through a
256-entry table per channel, which holds exactly HF's arithmetic for every uint8 level (a table
lookup is exact by construction and, per image, in cache, faster than the arithmetic on the
whole batch).
"""

from __future__ import annotations

import math
import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, fields
from typing import Any, BinaryIO, Sequence

import numpy as np
import torch
from PIL import Image, ImageOps

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
MODES = ("resize_crop", "pad_square", "resize")
# PIL resampling filters by name; the numbers are what HF's `resample` field stores.
INTERPOLATIONS = {
    "nearest": Image.Resampling.NEAREST,  # 0
    "lanczos": Image.Resampling.LANCZOS,  # 1
    "bilinear": Image.Resampling.BILINEAR,  # 2
    "bicubic": Image.Resampling.BICUBIC,  # 3
    "box": Image.Resampling.BOX,  # 4
    "hamming": Image.Resampling.HAMMING,  # 5
}
RESCALE_FACTOR = 1 / 255  # HF's default `rescale_factor`, a Python float (float64)


class BadImageError(ValueError):
    """An image file that cannot be decoded safely; the message names the file.

    Data loaders catch this to skip (and count) bad images."""


@dataclass
class PreprocessConfig:
    """How raw images become `pixel_values`; saved as `preprocess.json` beside a checkpoint."""

    image_size: int = 224
    mode: str = "resize_crop"  # one of MODES
    mean: tuple[float, float, float] = OPENAI_CLIP_MEAN
    std: tuple[float, float, float] = OPENAI_CLIP_STD
    interpolation: str = "bicubic"  # one of INTERPOLATIONS
    # resize_crop only: shortest edge before the centre crop (HF's size.shortest_edge when it
    # differs from crop_size, e.g. 256 -> 224). None means image_size, as in CLIP.
    resize_size: int | None = None

    def __post_init__(self) -> None:
        def positive_int(name: str, v: Any) -> None:
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"PreprocessConfig.{name} must be a positive int, got {v!r}")

        positive_int("image_size", self.image_size)
        if self.mode not in MODES:
            raise ValueError(f"PreprocessConfig.mode must be one of {MODES}, got {self.mode!r}")
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(
                f"PreprocessConfig.interpolation must be one of {tuple(INTERPOLATIONS)}, got {self.interpolation!r}"
            )
        for name in ("mean", "std"):
            v = getattr(self, name)
            if isinstance(v, (str, bytes)) or not isinstance(v, Sequence) or len(v) != 3:
                raise ValueError(f"PreprocessConfig.{name} must be 3 numbers (R, G, B), got {v!r}")
            try:
                v = tuple(float(x) for x in v)
            except (TypeError, ValueError):
                raise ValueError(f"PreprocessConfig.{name} must be 3 numbers (R, G, B), got {v!r}") from None
            if not all(math.isfinite(x) for x in v):
                raise ValueError(f"PreprocessConfig.{name} must be finite, got {v!r}")
            setattr(self, name, v)
        if not all(0.0 <= m <= 1.0 for m in self.mean):
            raise ValueError(f"PreprocessConfig.mean is on the 0..1 scale, got {self.mean!r}")
        if not all(s > 0.0 for s in self.std):
            raise ValueError(f"PreprocessConfig.std must be > 0, got {self.std!r}")
        if self.resize_size is not None:
            positive_int("resize_size", self.resize_size)
            if self.mode != "resize_crop":
                raise ValueError(f"PreprocessConfig.resize_size only applies to mode 'resize_crop', not {self.mode!r}")

    @property
    def shortest_edge(self) -> int:
        return self.image_size if self.resize_size is None else self.resize_size

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PreprocessConfig:
        unknown = sorted(set(d) - {f.name for f in fields(cls)})
        if unknown:
            raise ValueError(f"unknown PreprocessConfig keys: {unknown}")
        return cls(**d)

    @classmethod
    def from_hf(cls, d: dict[str, Any]) -> PreprocessConfig:
        """From an HF `preprocessor_config.json` of CLIPImageProcessor (or LlavaImageProcessor with
        `do_pad`). Missing keys take CLIPImageProcessor's class defaults, as HF does."""
        where = "preprocessor_config"

        def get(key: str, default: Any) -> Any:  # HF writes None for "unset"
            return default if d.get(key) is None else d[key]

        if not get("do_resize", True):
            raise ValueError(f"{where}: do_resize=False is not supported (images must come out S×S)")
        if not get("do_rescale", True) or abs(get("rescale_factor", RESCALE_FACTOR) - RESCALE_FACTOR) > 1e-12:
            raise ValueError(f"{where}: only do_rescale=True with rescale_factor=1/255 is supported")
        if not get("do_normalize", True):
            raise ValueError(f"{where}: do_normalize=False is not supported")
        resample = int(get("resample", Image.Resampling.BICUBIC))
        names = {int(v): k for k, v in INTERPOLATIONS.items()}
        if resample not in names:
            raise ValueError(f"{where}: unknown resample {resample}")
        size = get("size", {"shortest_edge": 224})
        size = {"shortest_edge": size} if isinstance(size, int) else {k: v for k, v in size.items() if v is not None}
        crop = get("crop_size", {"height": 224, "width": 224})
        crop = {"height": crop, "width": crop} if isinstance(crop, int) else crop
        do_crop, do_pad = get("do_center_crop", True), get("do_pad", False)
        if do_crop and crop.get("height") != crop.get("width"):
            raise ValueError(f"{where}: only a square crop_size is supported, got {crop}")
        kw: dict[str, Any] = dict(
            mean=tuple(get("image_mean", OPENAI_CLIP_MEAN)),
            std=tuple(get("image_std", OPENAI_CLIP_STD)),
            interpolation=names[resample],
        )
        if set(size) == {"shortest_edge"}:
            edge = size["shortest_edge"]
            if not do_crop:
                raise ValueError(f"{where}: a shortest_edge resize without a centre crop gives unequal sizes")
            if do_pad and edge != crop["height"]:
                raise ValueError(f"{where}: do_pad needs size.shortest_edge == crop_size, got {size} and {crop}")
            mode = "pad_square" if do_pad else "resize_crop"
            resize_size = None if edge == crop["height"] else edge
            return cls(image_size=crop["height"], mode=mode, resize_size=resize_size, **kw)
        if set(size) != {"height", "width"} or size["height"] != size["width"]:
            raise ValueError(f"{where}: size must be {{shortest_edge}} or a square {{height, width}}, got {size}")
        if do_crop and crop["height"] != size["height"]:
            raise ValueError(f"{where}: a centre crop after a square resize is not supported ({size}, {crop})")
        return cls(image_size=size["height"], mode="pad_square" if do_pad else "resize", **kw)

    def to_hf(self) -> dict[str, Any]:
        """The `preprocessor_config.json` dict of the HF image processor doing the same thing."""
        s = self.image_size
        d: dict[str, Any] = {
            "image_processor_type": "LlavaImageProcessor" if self.mode == "pad_square" else "CLIPImageProcessor",
            "do_convert_rgb": True,
            "do_resize": True,
            "size": {"height": s, "width": s} if self.mode == "resize" else {"shortest_edge": self.shortest_edge},
            "resample": int(INTERPOLATIONS[self.interpolation]),
            "do_center_crop": self.mode != "resize",
            "crop_size": {"height": s, "width": s},
            "do_rescale": True,
            "rescale_factor": RESCALE_FACTOR,
            "do_normalize": True,
            "image_mean": list(self.mean),
            "image_std": list(self.std),
        }
        if self.mode == "pad_square":
            d["do_pad"] = True
        return d


def load_image(path: str | os.PathLike | BinaryIO, *, max_pixels: int | None = None, exif_transpose: bool = True,
               name: str | None = None) -> Image.Image:
    """Decode an image file fully into memory as RGB, or raise BadImageError naming the file.

    `max_pixels` (default: PIL's `Image.MAX_IMAGE_PIXELS`) refuses decompression bombs from the
    header, before any pixel is decoded. `exif_transpose` turns camera photos upright, as HF's
    `load_image` does."""
    limit = Image.MAX_IMAGE_PIXELS if max_pixels is None else max_pixels
    if name is None:  # what error messages call the image: its path, or the name given for in-memory bytes
        name = os.fspath(path) if isinstance(path, (str, os.PathLike)) else "<in-memory image>"
    try:
        with warnings.catch_warnings():
            # Our own limit decides; PIL still raises DecompressionBombError above 2x its global.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                w, h = im.size
                if limit is not None and w * h > limit:
                    raise BadImageError(
                        f"image {name!r} is {w}x{h} = {w * h} pixels, over the limit of {limit} "
                        "(possible decompression bomb)"
                    )
                im.load()
                out = ImageOps.exif_transpose(im) if exif_transpose else im
                rgb = to_rgb(out)
                # Leaving `with` closes `im`, which invalidates its pixels: never return it.
                return im.copy() if rgb is im else rgb
    except BadImageError:
        raise
    except Exception as e:  # untrusted bytes: PIL plugins raise OSError, SyntaxError, struct.error, ...
        raise BadImageError(f"cannot read image {name!r}: {type(e).__name__}: {e}") from e


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB as HF's `convert_to_rgb`: transparency is composited onto white, anything else is
    `image.convert("RGB")` (so a 16-bit 'I;16' image saturates at 255, as in HF)."""
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image if image.mode == "RGB" else image.convert("RGB")


def shortest_edge_size(width: int, height: int, edge: int) -> tuple[int, int]:
    """(width, height) after resizing the shortest side to `edge`, as HF's
    `get_resize_output_image_size(default_to_square=False)`: the long side is truncated, not rounded."""
    short, long = (width, height) if width <= height else (height, width)
    new_long = int(edge * long / short)
    return (edge, new_long) if width <= height else (new_long, edge)


def normalization_table(mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """(3, 256) float32: the normalised value of every uint8 level per channel, in HF's dtypes:
    `rescale` multiplies in float64 and casts to float32, `normalize` subtracts and divides in float32."""
    x = (torch.arange(256, dtype=torch.float64) * RESCALE_FACTOR).to(torch.float32)  # (256,)
    m = torch.tensor(mean, dtype=torch.float32).view(3, 1)
    return (x - m) / torch.tensor(std, dtype=torch.float32).view(3, 1)  # (3, 256)


class ImageProcessor:
    """PIL images -> normalised `pixel_values` (N, 3, S, S) float32, per a PreprocessConfig.

    Equal to transformers' CLIPImageProcessor (PIL backend) configured by `config.to_hf()`."""

    def __init__(self, config: PreprocessConfig | None = None, *, max_pixels: int | None = None,
                 exif_transpose: bool = True, num_threads: int = 1):
        self.config = config if config is not None else PreprocessConfig()
        self.max_pixels, self.exif_transpose, self.num_threads = max_pixels, exif_transpose, num_threads
        self.resample = INTERPOLATIONS[self.config.interpolation]
        self._mean = torch.tensor(self.config.mean, dtype=torch.float32).view(1, 3, 1, 1)
        self._std = torch.tensor(self.config.std, dtype=torch.float32).view(1, 3, 1, 1)
        self._table = normalization_table(self.config.mean, self.config.std)  # (3, 256)
        self._lut = self._table.numpy()

    def load(self, path: str | os.PathLike) -> Image.Image:
        """Open an image file as RGB; BadImageError (a ValueError naming the file) if it can't be."""
        return load_image(path, max_pixels=self.max_pixels, exif_transpose=self.exif_transpose)

    def __call__(self, images: Image.Image | Sequence[Image.Image]) -> torch.Tensor:
        if isinstance(images, Image.Image):
            images = [images]
        for i, im in enumerate(images):
            if not isinstance(im, Image.Image):
                raise TypeError(f"ImageProcessor takes PIL images, got {type(im).__name__} at index {i}")
            if im.width < 1 or im.height < 1:
                raise ValueError(f"image {i} is empty ({im.width}x{im.height})")
        s = self.config.image_size
        out = np.empty((len(images), 3, s, s), dtype=np.float32)  # (N, 3, S, S)

        def one(i: int) -> None:
            self._normalize_into(self.pixels(images[i]), out[i])

        if self.num_threads > 1 and len(images) > 1:
            with ThreadPoolExecutor(self.num_threads) as pool:
                list(pool.map(one, range(len(images))))
        else:
            for i in range(len(images)):
                one(i)
        return torch.from_numpy(out)

    def pixels(self, image: Image.Image) -> np.ndarray:
        """One image -> uint8 (h, w, 3), the pixels HF has before `rescale`; h, w == S except
        where a centre crop is larger than the image (HF then pads, see `_normalize_into`)."""
        cfg, s = self.config, self.config.image_size
        image = to_rgb(image)
        if cfg.mode == "pad_square":
            # LLaVA's expand2square; the colour truncates (int), as LLaVA and HF do.
            w, h = image.size
            if w != h:
                square = Image.new("RGB", (max(w, h), max(w, h)), tuple(int(m * 255) for m in cfg.mean))
                square.paste(image, (0, (w - h) // 2) if w > h else ((h - w) // 2, 0))
                image = square
            # HF then resizes the shortest edge to S (a square: S×S) and centre-crops S (a no-op).
        if cfg.mode != "resize_crop":
            return np.asarray(image.resize((s, s), self.resample))
        resized = np.asarray(image.resize(shortest_edge_size(*image.size, cfg.shortest_edge), self.resample))
        h, w = resized.shape[:2]
        top, left = max(0, (h - s) // 2), max(0, (w - s) // 2)  # HF's center_crop: floor((size - crop) / 2)
        return resized[top:top + s, left:left + s]

    def _normalize_into(self, pixels: np.ndarray, out: np.ndarray) -> None:
        """uint8 (h, w, 3) -> normalised float32 `out` (3, H, W), through the 256-entry table per
        channel: the same numbers as the arithmetic, a few times faster, one image in cache at a time."""
        (h, w), (oh, ow) = pixels.shape[:2], out.shape[1:]
        if (h, w) != (oh, ow):  # HF pads a too-small crop with zeros, before rescale and normalise,
            out[:] = self._lut[:, :1, None]  # so the border is the normalised value of 0,
        top, left = (oh - h + 1) // 2, (ow - w + 1) // 2  # and the image sits at ceil((S - size) / 2).
        for c in range(3):
            np.take(self._lut[c], pixels[..., c], out=out[c, top:top + h, left:left + w], mode="clip")

    def normalize(self, images: torch.Tensor, channels_last: bool | None = None) -> torch.Tensor:
        """(x / 255 - mean) / std for decoded images: uint8 in 0..255 or float in 0..1, shaped
        (N, H, W, 3) or (N, 3, H, W) (or one image without N). Returns float32 (N, 3, H, W).

        `channels_last=None` guesses from where the 3 is (channels first wins a tie). The dtypes
        follow HF's `rescale` (float64 multiply, then float32) and `normalize` (float32): see
        `normalization_table`."""
        x = images if images.dim() == 4 else images.unsqueeze(0)
        if x.dim() != 4:
            raise ValueError(f"normalize expects (N, H, W, 3) or (N, 3, H, W), got shape {tuple(images.shape)}")
        if channels_last is None:
            channels_last = x.shape[1] != 3 and x.shape[3] == 3
        x = x.permute(0, 3, 1, 2) if channels_last else x  # (N, 3, H, W)
        if x.shape[1] != 3:
            raise ValueError(f"normalize expects 3 channels, got shape {tuple(images.shape)}")
        if x.dtype == torch.uint8 and x.device.type == "cpu":
            out = np.empty(x.shape, dtype=np.float32)
            for i in range(len(x)):
                self._normalize_into(x[i].permute(1, 2, 0).numpy(), out[i])
            return torch.from_numpy(out)
        if x.dtype == torch.uint8:  # on an accelerator: gather from the same table (MPS has no float64)
            table = self._table.to(x.device)
            offset = torch.arange(0, 768, 256, device=x.device).view(1, 3, 1, 1)  # channel c -> row c
            return table.view(-1)[x.long() + offset]
        if not x.is_floating_point():
            raise TypeError(f"normalize expects uint8 or float images, got {x.dtype}")
        return (x.float() - self._mean.to(x.device)) / self._std.to(x.device)

    def denormalize(self, pixel_values: torch.Tensor, uint8: bool = False) -> torch.Tensor:
        """Back to viewable images: float in 0..1 (N, 3, H, W), or uint8 (N, H, W, 3) if `uint8`."""
        x = pixel_values.float()
        x = (x * self._std.to(x.device) + self._mean.to(x.device)).clamp_(0, 1)
        if uint8:
            return x.mul_(255).round_().to(torch.uint8).permute(0, 2, 3, 1).contiguous()
        return x
