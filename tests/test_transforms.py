"""mmlm.data.transforms against transformers' PIL image processors (CLIP, and LLaVA's pad-to-square)."""

import importlib.util
import io
import json
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mmlm.data.transforms import (
    BadImageError,
    ImageProcessor,
    PreprocessConfig,
    load_image,
    shortest_edge_size,
)

transformers = pytest.importorskip("transformers")
# The PIL backend explicitly: in transformers 5 `CLIPImageProcessor` means the torchvision one
# when torchvision is installed (it falls back to this class only when it is not).
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil  # noqa: E402
from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil  # noqa: E402

SKIMAGE_DATA = Path(importlib.util.find_spec("skimage").origin).parent / "data"
TOL = 1e-5


def photo(name: str) -> Image.Image:
    with Image.open(SKIMAGE_DATA / name) as im:
        im.load()
        return im.copy()


@pytest.fixture(scope="module")
def photos() -> dict[str, Image.Image]:
    return {
        "astronaut": photo("astronaut.png"),  # RGB square 512x512
        "chelsea": photo("chelsea.png"),  # RGB landscape 451x300 (odd width)
        "coffee_portrait": photo("coffee.png").transpose(Image.Transpose.ROTATE_90),  # RGB 400x600
        "rocket": photo("rocket.jpg"),  # JPEG landscape 640x427
        "cell": photo("cell.png"),  # grayscale portrait 550x660
        "page": photo("page.png"),  # grayscale wide 384x191
        "horse": photo("horse.png"),  # RGBA 400x328
        "gif": photo("no_time_for_that_tiny.gif"),  # palette 14x25 (smaller than every crop)
    }


def hf_processor(cfg: PreprocessConfig):
    d = cfg.to_hf()
    kind = d.pop("image_processor_type")
    proc = (LlavaImageProcessorPil if kind == "LlavaImageProcessor" else CLIPImageProcessorPil)(**d)
    assert proc.backend == "pil"
    return proc


def hf_pixels(proc, images) -> torch.Tensor:
    return torch.from_numpy(np.stack(proc(images, return_tensors="np")["pixel_values"]))


def max_diff(cfg: PreprocessConfig, images) -> float:
    ours = ImageProcessor(cfg)(images)
    ref = hf_pixels(hf_processor(cfg), images)
    assert ours.shape == ref.shape == (len(images), 3, cfg.image_size, cfg.image_size)
    assert ours.dtype == torch.float32
    return (ours - ref).abs().max().item()


# ---------------------------------------------------------------------------- parity on real photos


@pytest.mark.parametrize("size", [224, 336, 97])
def test_real_photos_match_hf(photos, size):
    assert max_diff(PreprocessConfig(image_size=size), list(photos.values())) <= TOL


@pytest.mark.parametrize("mode", ["pad_square", "resize"])
@pytest.mark.parametrize("size", [224, 97])
def test_other_modes_match_hf(photos, mode, size):
    assert max_diff(PreprocessConfig(image_size=size, mode=mode), list(photos.values())) <= TOL


@pytest.mark.parametrize("interpolation", ["bilinear", "nearest", "lanczos"])
def test_other_interpolations_match_hf(photos, interpolation):
    images = [photos["chelsea"], photos["cell"]]
    assert max_diff(PreprocessConfig(image_size=97, interpolation=interpolation), images) <= TOL


def test_mean_std_from_config_match_hf(photos):
    cfg = PreprocessConfig(image_size=64, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))  # SigLIP-style
    assert max_diff(cfg, [photos["rocket"], photos["astronaut"]]) <= TOL


def test_threads_give_the_same_batch(photos):
    images = list(photos.values())
    one = ImageProcessor(PreprocessConfig(image_size=97))(images)
    two = ImageProcessor(PreprocessConfig(image_size=97), num_threads=2)(images)
    assert torch.equal(one, two)


# ---------------------------------------------------------------------------- synthetic edge cases


def synthetic_images() -> list[Image.Image]:
    rng = np.random.default_rng(0)

    def rgb(w, h):
        return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))

    rgba = Image.fromarray(rng.integers(0, 256, (31, 45, 4), dtype=np.uint8), "RGBA")  # partial transparency
    la = Image.fromarray(rng.integers(0, 256, (20, 13, 2), dtype=np.uint8), "LA")
    pal = rgb(40, 30).quantize(16)  # "P"
    pal_t = pal.copy()
    pal_t.info["transparency"] = 3  # palette index 3 is transparent
    i16 = Image.fromarray(rng.integers(0, 400, (17, 23), dtype=np.uint16))  # "I;16": HF clips at 255
    return [
        rgb(1, 1), rgb(3, 2), rgb(2, 3),  # tiny: smaller than any crop
        rgb(1, 50), rgb(50, 1), rgb(1, 300),  # one-pixel strips
        rgb(5, 7), rgb(223, 225), rgb(225, 223), rgb(301, 97),  # odd sizes and odd differences
        rgba, la, pal, pal_t, i16,
        Image.fromarray(rng.integers(0, 256, (19, 11), dtype=np.uint8)),  # "L"
        rgb(12, 9).convert("CMYK"),
        rgb(10, 14).convert("1"),
    ]


@pytest.mark.parametrize("mode", ["resize_crop", "pad_square", "resize"])
@pytest.mark.parametrize("size", [224, 97])
def test_synthetic_edge_cases_match_hf(mode, size):
    images = synthetic_images()
    assert {im.mode for im in images} >= {"RGB", "RGBA", "LA", "P", "I;16", "L", "CMYK", "1"}
    for im in images:  # one at a time, so a failure names the image
        assert max_diff(PreprocessConfig(image_size=size, mode=mode), [im]) <= TOL, (im.mode, im.size)


@pytest.mark.parametrize("resize_size", [48, 47, 30])
def test_crop_larger_than_resized_image_pads_like_hf(resize_size):
    # shortest_edge < crop_size: HF's center_crop zero-pads (before normalising) with the image at
    # ceil((crop - size) / 2): odd differences included.
    images = synthetic_images()[:10] + [photo("chelsea.png"), photo("cell.png")]
    cfg = PreprocessConfig(image_size=64, resize_size=resize_size)
    for im in images:
        assert max_diff(cfg, [im]) <= TOL, im.size


def test_shortest_edge_truncates_like_hf():
    assert shortest_edge_size(500, 375, 224) == (298, 224)  # 298.67 -> 298: truncated, not rounded
    assert shortest_edge_size(375, 500, 224) == (224, 298)
    assert shortest_edge_size(7, 7, 97) == (97, 97)
    assert shortest_edge_size(1, 50, 224) == (224, 11200)


# ---------------------------------------------------------------------------- pad_square (LLaVA-1.5)


def expand2square(img: Image.Image, background) -> Image.Image:
    """LLaVA-1.5's expand2square, written out independently."""
    w, h = img.size
    if w == h:
        return img
    side = max(w, h)
    out = Image.new(img.mode, (side, side), background)
    out.paste(img, (0, (w - h) // 2) if w > h else ((h - w) // 2, 0))
    return out


@pytest.mark.parametrize("size", [336, 97])
def test_pad_square_equals_expand2square_then_clip_processor(photos, size):
    cfg = PreprocessConfig(image_size=size, mode="pad_square")
    background = tuple(int(x * 255) for x in cfg.mean)
    assert background == (122, 116, 104)
    rng = np.random.default_rng(1)
    images = [photos[k].convert("RGB") for k in ("astronaut", "chelsea", "coffee_portrait", "page")]
    images += [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for w, h in [(7, 4), (4, 9), (1, 6)]]
    clip = CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    ref = hf_pixels(clip, [expand2square(im, background) for im in images])
    assert (ImageProcessor(cfg)(images) - ref).abs().max().item() <= TOL


# ---------------------------------------------------------------------------- normalize / denormalize


def test_normalize_uint8_any_layout_equals_processor(photos):
    cfg = PreprocessConfig(image_size=64, mode="resize")
    proc = ImageProcessor(cfg)
    images = [photos["rocket"], photos["astronaut"]]
    pixels = torch.from_numpy(np.stack([np.asarray(im.resize((64, 64), Image.Resampling.BICUBIC)) for im in images]))
    expected = proc(images)
    assert torch.equal(proc.normalize(pixels), expected)  # (N, H, W, 3)
    assert torch.equal(proc.normalize(pixels.permute(0, 3, 1, 2)), expected)  # (N, 3, H, W)
    assert torch.equal(proc.normalize(pixels[0]), expected[:1])  # one image
    as_float = proc.normalize(pixels.double() / 255)  # float input is taken as 0..1
    assert (as_float - expected).abs().max().item() <= TOL
    # denormalize for viewing recovers the uint8 pixels exactly
    assert torch.equal(proc.denormalize(expected, uint8=True), pixels)
    back = proc.denormalize(expected)
    assert back.shape == (2, 3, 64, 64) and back.min() >= 0 and back.max() <= 1


def test_normalize_rejects_bad_shapes():
    proc = ImageProcessor()
    with pytest.raises(ValueError, match="3 channels"):
        proc.normalize(torch.zeros(2, 4, 8, 8, dtype=torch.uint8))
    with pytest.raises(ValueError, match="expects"):
        proc.normalize(torch.zeros(8, 8, dtype=torch.uint8))
    with pytest.raises(TypeError, match="uint8 or float"):
        proc.normalize(torch.zeros(1, 3, 8, 8, dtype=torch.int32))


def test_call_inputs():
    proc = ImageProcessor(PreprocessConfig(image_size=32))
    im = Image.new("RGB", (40, 30), (10, 20, 30))
    assert proc(im).shape == (1, 3, 32, 32)
    assert proc([im, im, im]).shape == (3, 3, 32, 32)
    assert proc([]).shape == (0, 3, 32, 32)
    with pytest.raises(TypeError, match="PIL images.*ndarray.*index 1"):
        proc([im, np.zeros((4, 4, 3), np.uint8)])
    with pytest.raises(ValueError, match="empty"):
        proc(Image.new("RGB", (0, 5)))


# ---------------------------------------------------------------------------- loading files safely


def test_load_returns_rgb_like_hf(tmp_path):
    rgba = Image.fromarray(np.random.default_rng(2).integers(0, 256, (20, 30, 4), dtype=np.uint8), "RGBA")
    path = tmp_path / "a.png"
    rgba.save(path)
    loaded = ImageProcessor().load(path)
    assert loaded.mode == "RGB" and loaded.size == (30, 20)
    assert max_diff(PreprocessConfig(image_size=16), [loaded]) <= TOL
    assert torch.equal(ImageProcessor(PreprocessConfig(image_size=16))(loaded),
                       hf_pixels(hf_processor(PreprocessConfig(image_size=16)), [rgba]))
    rgb = SKIMAGE_DATA / "rocket.jpg"
    assert np.array_equal(np.asarray(load_image(rgb)), np.asarray(photo("rocket.jpg")))


def test_load_applies_exif_orientation(tmp_path):
    im = Image.new("RGB", (40, 20), (200, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 CW to view
    path = tmp_path / "rotated.jpg"
    im.save(path, exif=exif.tobytes())
    assert load_image(path).size == (20, 40)
    assert load_image(path, exif_transpose=False).size == (40, 20)


def test_truncated_jpeg_is_bad_image(tmp_path):
    path = tmp_path / "truncated.jpg"
    path.write_bytes((SKIMAGE_DATA / "rocket.jpg").read_bytes()[:5000])
    with pytest.raises(BadImageError, match="truncated.jpg"):
        ImageProcessor().load(path)


def test_non_image_and_missing_files_are_bad_images(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("not an image\n")
    with pytest.raises(BadImageError, match="notes.txt"):
        load_image(path)
    with pytest.raises(ValueError, match="nowhere.png"):  # BadImageError is a ValueError
        load_image(tmp_path / "nowhere.png")


def png_claiming_size(path: Path, width: int, height: int) -> None:
    """A small valid PNG whose header then claims width x height (a decompression bomb's header)."""
    buf = io.BytesIO()
    Image.new("L", (8, 8)).save(buf, "PNG")
    data = bytearray(buf.getvalue())
    assert data[12:16] == b"IHDR"
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    path.write_bytes(bytes(data))


def test_decompression_bombs_are_bad_images(tmp_path, monkeypatch):
    bomb = tmp_path / "bomb.png"
    png_claiming_size(bomb, 100_000, 100_000)  # 10 gigapixels claimed; refused from the header
    with pytest.raises(BadImageError, match="(?i)bomb.png.*decompression bomb"):
        ImageProcessor().load(bomb)
    small = tmp_path / "small.png"
    Image.new("RGB", (100, 100)).save(small)
    assert ImageProcessor(max_pixels=10_000).load(small).size == (100, 100)
    with pytest.raises(BadImageError, match="small.png.*decompression bomb"):
        ImageProcessor(max_pixels=9_999).load(small)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 5_000)  # the default limit follows PIL's
    with pytest.raises(BadImageError, match="small.png"):
        load_image(small)


# ---------------------------------------------------------------------------- config


def test_config_round_trip():
    for cfg in [PreprocessConfig(), PreprocessConfig(image_size=336, mode="pad_square", interpolation="bilinear"),
                PreprocessConfig(image_size=224, resize_size=256, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))]:
        assert PreprocessConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
        assert PreprocessConfig.from_hf(json.loads(json.dumps(cfg.to_hf()))) == cfg


def test_config_lists_become_tuples():
    cfg = PreprocessConfig(mean=[0.5, 0.5, 0.5], std=[1, 1, 1])
    assert cfg.mean == (0.5, 0.5, 0.5) and cfg.std == (1.0, 1.0, 1.0)


@pytest.mark.parametrize("kwargs, match", [
    (dict(image_size=0), "image_size"),
    (dict(image_size="224"), "image_size"),
    (dict(image_size=True), "image_size"),
    (dict(mode="crop"), "mode"),
    (dict(interpolation="cubic"), "interpolation"),
    (dict(mean=(0.5, 0.5)), "mean"),
    (dict(mean="abc"), "mean"),
    (dict(mean=(128, 128, 128)), "mean"),
    (dict(std=(0.2, 0.0, 0.2)), "std"),
    (dict(std=(0.2, float("nan"), 0.2)), "std"),
    (dict(resize_size=0), "resize_size"),
    (dict(mode="pad_square", resize_size=256), "resize_size"),
])
def test_bad_config_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PreprocessConfig(**kwargs)


def test_from_dict_names_unknown_keys():
    with pytest.raises(ValueError, match="crop_pct.*sizee|sizee"):
        PreprocessConfig.from_dict({"image_size": 224, "sizee": 3, "crop_pct": 0.9})


def test_from_hf_real_configs():
    # openai/clip-vit-base-patch32 (old style: int size and crop_size)
    old = {"crop_size": 224, "do_center_crop": True, "do_normalize": True, "do_resize": True,
           "feature_extractor_type": "CLIPFeatureExtractor", "image_mean": [0.48145466, 0.4578275, 0.40821073],
           "image_std": [0.26862954, 0.26130258, 0.27577711], "resample": 3, "size": 224}
    assert PreprocessConfig.from_hf(old) == PreprocessConfig()
    # llava-hf/llava-1.5-7b-hf style: 336, LlavaImageProcessor with do_pad
    llava = {"crop_size": {"height": 336, "width": 336}, "do_pad": True, "do_center_crop": True,
             "image_processor_type": "LlavaImageProcessor", "size": {"shortest_edge": 336}, "resample": 3}
    assert PreprocessConfig.from_hf(llava) == PreprocessConfig(image_size=336, mode="pad_square")
    # what transformers itself writes
    for cfg in [PreprocessConfig(), PreprocessConfig(image_size=97, mode="pad_square"),
                PreprocessConfig(image_size=64, mode="resize"), PreprocessConfig(image_size=64, resize_size=72)]:
        assert PreprocessConfig.from_hf(json.loads(hf_processor(cfg).to_json_string())) == cfg


def test_to_hf_loads_in_transformers(tmp_path, photos):
    cfg = PreprocessConfig(image_size=97, resize_size=110, interpolation="bicubic")
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(cfg.to_hf()))
    hf = CLIPImageProcessorPil.from_pretrained(tmp_path)
    images = [photos["chelsea"], photos["cell"]]
    assert (ImageProcessor(cfg)(images) - hf_pixels(hf, images)).abs().max().item() <= TOL


@pytest.mark.parametrize("hf, match", [
    ({"crop_size": {"height": 224, "width": 200}}, "square crop_size"),
    ({"do_normalize": False}, "do_normalize"),
    ({"rescale_factor": 1.0}, "rescale"),
    ({"resample": 9}, "resample"),
    ({"size": {"shortest_edge": 224, "longest_edge": 500}}, "size"),
    ({"size": {"height": 224, "width": 300}, "do_center_crop": False}, "size"),
    ({"do_center_crop": False}, "without a centre crop"),
])
def test_from_hf_refuses_what_it_cannot_match(hf, match):
    with pytest.raises(ValueError, match=match):
        PreprocessConfig.from_hf(hf)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_normalize_on_gpu_equals_cpu():
    proc = ImageProcessor()
    u = torch.randint(0, 256, (2, 3, 17, 23), dtype=torch.uint8)
    assert torch.equal(proc.normalize(u.cuda()).cpu(), proc.normalize(u))
    torch.testing.assert_close(proc.normalize(u.cuda().float() / 255).cpu(), proc.normalize(u.float() / 255))
