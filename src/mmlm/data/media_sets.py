"""The embedded video and audio datasets, generated offline and written as real media files.

    moving shapes   one shape per clip doing one action (8-16 frames) -> mp4 (H.264, PyAV) + captions
    sounds          tones, chords, chirps, counted beeps, noise colours -> wav (16 kHz) + captions
    spoken          digits spoken by espeak-ng with many voices, speeds and pitches -> wav (16 kHz) + captions

Each is deterministic from a seed, written as `<split>/NNNNNN.mp4|wav` + `<split>.csv` (`video` or `audio`,
`caption`, `label`, ...) + `classes.json` (the class names and prompt templates zero-shot evaluation uses), so
that the same CSV readers as for any user's files (data/media.py) load them.

Held out for compositional zero-shot: moving shapes keeps 8 (action, shape) pairs out of training (every action
and every shape still appears), the `novel` split holds only those; spoken keeps some voices out of training,
the `novel` split speaks only with them.
"""

from __future__ import annotations

import csv
import io
import json
import math
import shutil
import subprocess
from pathlib import Path
from typing import Any, Callable

import numpy as np

from .media import resample, write_audio, write_video
from .shapes import COLOUR_RGB, COLOURS, SHAPES, object_mask

# ---------------------------------------------------------------------------------------------- moving shapes

ACTIONS = ("moving left", "moving right", "moving up", "moving down", "growing", "shrinking", "spinning",
           "blinking", "changing colour", "bouncing")
# one held-out action per shape, each action at most once: every action and every shape is still seen
HELD_OUT_ACTIONS = tuple((SHAPES[i], ACTIONS[(3 * i) % len(ACTIONS)]) for i in range(len(SHAPES)))
VIDEO_TEMPLATES = ("a video of {}.", "{}.", "a clip of {}.")
# zero-shot action prompts leave the object unnamed; half the training captions do too (ActionCLIP's texts are
# the action alone): a caption that names colour and shape is matched without looking at the motion, so only
# these captions make a batch tell "moving left" from "moving right"
ACTION_TEMPLATES = ("something {}.", "a video of something {}.")
_SYMMETRIC = {"circle"}  # a spinning circle looks still: never asked to spin


def _action_pairs(split: str) -> list[tuple[str, str]]:
    pairs = [(s, a) for s in SHAPES for a in ACTIONS if not (s in _SYMMETRIC and a == "spinning")]
    held = set(HELD_OUT_ACTIONS)
    return [p for p in pairs if (p in held) == (split == "novel")]


def render_action(shape: str, colour: str, action: str, rng: np.random.Generator, frames: int = 8,
                  size: int = 64) -> np.ndarray:
    """uint8 (T, S, S, 3): one `colour` `shape` doing `action` on a dark noisy background."""
    T, S = frames, size
    r0 = S * rng.uniform(0.12, 0.16)
    cx, cy = S / 2 + rng.uniform(-0.1, 0.1) * S, S / 2 + rng.uniform(-0.1, 0.1) * S
    travel = S * rng.uniform(0.45, 0.55)  # a move crosses about half the frame
    angle0 = rng.uniform(0, 2 * math.pi)
    other = COLOURS[(COLOURS.index(colour) + rng.integers(1, len(COLOURS))) % len(COLOURS)]
    background = rng.integers(8, 40, size=(S, S, 1)).astype(np.float32)
    out = np.empty((T, S, S, 3), dtype=np.uint8)
    for t in range(T):
        u = t / max(T - 1, 1)  # 0 .. 1 through the clip
        x, y, r, a, c, visible = cx, cy, r0, angle0, colour, True
        if action.startswith("moving"):
            d = (u - 0.5) * travel
            x, y = {"moving left": (cx - d, cy), "moving right": (cx + d, cy),
                    "moving up": (cx, cy - d), "moving down": (cx, cy + d)}[action]
        elif action == "growing":
            r = r0 * (0.6 + 1.0 * u)
        elif action == "shrinking":
            r = r0 * (1.6 - 1.0 * u)
        elif action == "spinning":
            a = angle0 + u * math.pi * 0.9  # an eighth of a turn a frame for 8 frames: no symmetry aliasing
        elif action == "blinking":
            visible = t % 2 == 0
        elif action == "changing colour":
            c = colour if u < 0.5 else other
        elif action == "bouncing":
            y = cy + travel * 0.5 - travel * abs(math.sin(2 * math.pi * u))  # down to the floor and up, twice
        img = np.repeat(background, 3, axis=2).copy()
        if visible:
            alpha = object_mask(shape, x, y, r, a, 0, 0, S, S)[..., None]
            img += (np.asarray(COLOUR_RGB[c], dtype=np.float32) - img) * alpha
        out[t] = np.clip(img + 0.5, 0, 255).astype(np.uint8)
    return out


def moving_shape_item(split: str, index: int, seed: int = 0, frames: int = 8, size: int = 64) -> dict[str, Any]:
    """Clip `index` of a split: {"video" (T, S, S, 3), "caption", "label" (action index), "shape", "colour"}."""
    rng = np.random.default_rng([seed, ("train", "val", "novel").index(split), index])
    pairs = _action_pairs(split)
    shape, action = pairs[rng.integers(len(pairs))]
    colour = COLOURS[rng.integers(len(COLOURS))]
    text = f"{'an' if colour[0] in 'aeiou' else 'a'} {colour} {shape} {action}"
    if rng.random() < 0.5:
        caption = ACTION_TEMPLATES[rng.integers(len(ACTION_TEMPLATES))].format(action)
    else:
        caption = VIDEO_TEMPLATES[rng.integers(len(VIDEO_TEMPLATES))].format(text)
    return {"video": render_action(shape, colour, action, rng, frames, size), "caption": caption,
            "label": ACTIONS.index(action), "shape": shape, "colour": colour}


# ---------------------------------------------------------------------------------------------- sounds

SOUNDS = ("a low tone", "a high tone", "a chord", "a rising chirp", "a falling chirp", "two beeps", "three beeps",
          "four beeps", "white noise", "brown noise")
SOUND_TEMPLATES = ("the sound of {}.", "{}.", "a recording of {}.")


def _fade(wave: np.ndarray, rate: int, ms: float = 10.0) -> np.ndarray:
    n = len(wave)
    t = np.arange(n)
    return wave * np.clip(np.minimum(t, n - 1 - t) / (rate * ms / 1000), 0, 1)


def render_sound(kind: str, rng: np.random.Generator, seconds: float = 1.0, rate: int = 16_000) -> np.ndarray:
    """float32 (S,) in [-1, 1] of one SOUNDS class, with random pitch, loudness and a little background noise."""
    n = int(seconds * rate)
    t = np.arange(n) / rate
    if kind in ("a low tone", "a high tone"):
        f = rng.uniform(150, 400) if kind == "a low tone" else rng.uniform(1500, 3500)
        w = np.sin(2 * np.pi * f * t + rng.uniform(0, 2 * np.pi))
    elif kind == "a chord":  # a major triad: root, major third, fifth
        f = rng.uniform(200, 600)
        w = sum(np.sin(2 * np.pi * f * ratio * t) for ratio in (1.0, 5 / 4, 3 / 2)) / 3
    elif kind in ("a rising chirp", "a falling chirp"):
        lo, hi = rng.uniform(200, 500), rng.uniform(2000, 4000)
        f0, f1 = (lo, hi) if kind == "a rising chirp" else (hi, lo)
        w = np.sin(2 * np.pi * (f0 * t + (f1 - f0) * t**2 / (2 * seconds)))  # instantaneous f0 + (f1-f0) t/s
    elif kind.endswith("beeps"):
        count = {"two": 2, "three": 3, "four": 4}[kind.split()[0]]
        f, period = rng.uniform(600, 1200), seconds / (count + 0.5)
        on = ((t % period) < period * 0.5) & (t < count * period)
        w = np.sin(2 * np.pi * f * t) * on
    elif kind == "white noise":
        w = rng.standard_normal(n)
    elif kind == "brown noise":  # integrated white noise: power falls 6 dB an octave
        w = np.cumsum(rng.standard_normal(n))
        w = w - np.convolve(w, np.ones(801) / 801, mode="same")  # remove the slow drift
    else:
        raise ValueError(f"unknown sound {kind!r}; known: {SOUNDS}")
    w = _fade(np.asarray(w, dtype=np.float64), rate)
    w = w / (np.abs(w).max() + 1e-9) * rng.uniform(0.3, 0.9)
    return (w + rng.standard_normal(n) * 0.005).astype(np.float32)


def sound_item(split: str, index: int, seed: int = 0) -> dict[str, Any]:
    rng = np.random.default_rng([seed, 10 + ("train", "val", "novel").index(split), index])
    label = int(rng.integers(len(SOUNDS)))
    caption = SOUND_TEMPLATES[rng.integers(len(SOUND_TEMPLATES))].format(SOUNDS[label])
    return {"audio": render_sound(SOUNDS[label], rng), "caption": caption, "label": label}


# ---------------------------------------------------------------------------------------------- spoken words

WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
SPOKEN_TEMPLATES = ('someone saying "{}".', 'the word "{}".', '"{}".')
ACCENTS = ("en-us", "en-gb", "en-gb-scotland", "en-gb-x-rp", "en-gb-x-gbclan", "en-gb-x-gbcwmd", "en-029")
VARIANTS = ("m1", "m2", "m3", "m4", "f1", "f2", "f3", "f4")
VOICES = tuple(f"{a}+{v}" for a in ACCENTS for v in VARIANTS)
HELD_OUT_VOICES = tuple(f"{a}+{v}" for a, v in zip(ACCENTS, VARIANTS[1:] + VARIANTS[:1]))  # one per accent


def espeak(text: str, voice: str, speed: int, pitch: int, rate: int = 16_000) -> np.ndarray:
    """float32 (S,) `text` spoken by espeak-ng at `rate` Hz (espeak speaks at 22050 Hz; resampled)."""
    if shutil.which("espeak-ng") is None:
        raise RuntimeError("espeak-ng is not installed (Debian: apt-get install espeak-ng; `make setup` does it)")
    import soundfile as sf

    wav = subprocess.run(["espeak-ng", "-v", voice, "-s", str(speed), "-p", str(pitch), "--stdout", text],
                         check=True, capture_output=True).stdout
    wave, sr = sf.read(io.BytesIO(wav), dtype="float32")
    return resample(wave, sr, rate)


def spoken_item(split: str, index: int, seed: int = 0, seconds: float = 1.0, rate: int = 16_000) -> dict[str, Any]:
    """A digit spoken by a training voice (train, val) or a held-out voice (novel), placed in `seconds` of audio."""
    rng = np.random.default_rng([seed, 20 + ("train", "val", "novel").index(split), index])
    voices = HELD_OUT_VOICES if split == "novel" else tuple(v for v in VOICES if v not in HELD_OUT_VOICES)
    voice = voices[rng.integers(len(voices))]
    label = int(rng.integers(len(WORDS)))
    speech = espeak(WORDS[label], voice, int(rng.integers(120, 220)), int(rng.integers(20, 80)), rate)
    loud = np.flatnonzero(np.abs(speech) > 1e-3)
    if loud.size:  # espeak pads the word with silence: keep the word, place it at random
        speech = speech[loud[0] : loud[-1] + 1]
    n = int(seconds * rate)
    speech = speech[:n]
    out = np.zeros(n, dtype=np.float32)
    start = int(rng.integers(0, n - len(speech) + 1))
    out[start : start + len(speech)] = speech * rng.uniform(0.5, 1.0) / (np.abs(speech).max() + 1e-9)
    caption = SPOKEN_TEMPLATES[rng.integers(len(SPOKEN_TEMPLATES))].format(WORDS[label])
    return {"audio": out + rng.standard_normal(n).astype(np.float32) * 0.003, "caption": caption, "label": label,
            "voice": voice}


# ---------------------------------------------------------------------------------------------- conversations

# Questions about a clip or a sound, each with one short exact answer (for LLaVA: `mmlm eval vqa` scores them by
# exact match). Every question type is asked only where its answer exists (beeps are counted, chirps rise or fall).
_COUNTS = {"two beeps": "two", "three beeps": "three", "four beeps": "four"}


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def video_questions(shape: str, colour: str, action: str, rng: np.random.Generator) -> list[tuple[str, str, str]]:
    """(question, answer, qtype) for one clip of one `colour` `shape` doing `action`, every type once."""
    others = [a for a in ACTIONS if a != action and not (shape in _SYMMETRIC and a == "spinning")]
    asked = action if rng.random() < 0.5 else others[rng.integers(len(others))]
    return [(f"What is the {colour} {shape} doing?", action, "video_action"),
            ("Which shape is in the video?", shape, "video_shape"),
            (f"What colour is the {shape} at the start?", colour, "video_colour"),
            (f"Is the {colour} {shape} {asked}?", "yes" if asked == action else "no", "video_check")]


def sound_questions(kind: str) -> list[tuple[str, str, str]]:
    """(question, answer, qtype) for one SOUNDS class: what it is, and what can be told about it."""
    out = [("What do you hear?", kind, "audio_sound"),
           ("Is it a tone or noise?", "noise" if kind.endswith("noise") else "tone", "audio_noise")]
    if kind in _COUNTS:
        out.append(("How many beeps?", _COUNTS[kind], "audio_count"))
    if kind.endswith("chirp"):
        out.append(("Is the tone rising or falling?", kind.split()[1], "audio_direction"))
    if kind.endswith("tone"):
        out.append(("Is the tone low or high?", kind.split()[1], "audio_pitch"))
    return out


def media_conversation(split: str, index: int, kinds: str, seed: int = 0, n_questions: int = 3, frames: int = 8,
                       size: int = 64) -> dict[str, Any]:
    """One LLaVA sample about a generated clip (`kinds` "video"), a sound ("audio") or both at once ("video+audio":
    a clip and its soundtrack, each question about one of them): {id, images: [], videos: [uint8 (T, S, S, 3)],
    audios: [float32 (S,) at 16 kHz], conversations, caption, question_types, modality}. Sounds have no held-out
    split: `novel` asks about the clips of held-out (shape, action) pairs and the sounds of `val`."""
    rng = np.random.default_rng([seed, 30 + ("train", "val", "novel").index(split), index, len(kinds)])
    videos, audios, pool, captions = [], [], [], []
    if "video" in kinds:
        pairs = _action_pairs(split)
        shape, action = pairs[rng.integers(len(pairs))]
        colour = COLOURS[rng.integers(len(COLOURS))]
        videos.append(render_action(shape, colour, action, rng, frames, size))
        pool += video_questions(shape, colour, action, rng)
        captions.append(f"{_article(colour)} {colour} {shape} {action}.")
    if "audio" in kinds:
        kind = SOUNDS[rng.integers(len(SOUNDS))]
        audios.append(render_sound(kind, rng))
        pool += sound_questions(kind)
        captions.append(f"{kind}.")
    picks = [pool[k] for k in rng.permutation(len(pool))[:n_questions]]
    head = "".join(p + "\n" for p, media in (("<video>", videos), ("<audio>", audios)) if media)
    turns: list[dict[str, str]] = []
    for k, (q, a, _) in enumerate(picks):
        turns += [{"from": "human", "value": head + q if k == 0 else q}, {"from": "gpt", "value": a}]
    return {"id": f"{kinds}-{split}-{index}", "images": [], "videos": videos, "audios": audios,
            "conversations": turns, "caption": " ".join(captions), "question_types": [t for _, _, t in picks],
            "modality": kinds}


# ---------------------------------------------------------------------------------------------- writing

DATASETS: dict[str, dict[str, Any]] = {
    "moving-shapes": {"classes": ACTIONS, "templates": ACTION_TEMPLATES, "column": "video", "ext": ".mp4",
                      "held_out": [list(p) for p in HELD_OUT_ACTIONS]},
    "sounds": {"classes": SOUNDS, "templates": SOUND_TEMPLATES, "column": "audio", "ext": ".wav", "held_out": []},
    "spoken": {"classes": WORDS, "templates": SPOKEN_TEMPLATES, "column": "audio", "ext": ".wav",
               "held_out": list(HELD_OUT_VOICES)},
}


def write_media_dataset(name: str, out: str | Path, train: int = 2000, val: int = 200, novel: int = 200,
                        seed: int = 0, frames: int = 8, image_size: int = 64) -> dict[str, Any]:
    """Write `name` (moving-shapes | sounds | spoken) under `out`; returns a summary (counts, paths)."""
    if name not in DATASETS:
        raise ValueError(f"unknown media dataset {name!r}; known: {sorted(DATASETS)}")
    if not 8 <= frames <= 16 and name == "moving-shapes":
        raise ValueError(f"moving shapes clips have 8 to 16 frames, got {frames}")
    spec = DATASETS[name]
    make: Callable[[str, int], dict[str, Any]] = {
        "moving-shapes": lambda s, i: moving_shape_item(s, i, seed, frames, image_size),
        "sounds": lambda s, i: sound_item(s, i, seed),
        "spoken": lambda s, i: spoken_item(s, i, seed),
    }[name]
    out = Path(out)
    counts = {"train": train, "val": val, "novel": novel if name != "sounds" else 0}
    summary: dict[str, Any] = {"dataset": name, "out": str(out), "splits": {}}
    for split, n in counts.items():
        if n <= 0:
            continue
        (out / split).mkdir(parents=True, exist_ok=True)
        rows = []
        for i in range(n):
            item = make(split, i)
            rel = f"{split}/{i:06d}{spec['ext']}"
            if spec["column"] == "video":
                write_video(out / rel, item["video"], fps=8)
            else:
                write_audio(out / rel, item["audio"], 16_000)
            extra = {k: v for k, v in item.items() if k not in ("video", "audio", "caption", "label")}
            rows.append({spec["column"]: rel, "caption": item["caption"], "label": item["label"],
                         "class": spec["classes"][item["label"]], **extra})
        with open(out / f"{split}.csv", "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        summary["splits"][split] = {"csv": str(out / f"{split}.csv"), "items": n}
    (out / "classes.json").write_text(json.dumps({"classes": list(spec["classes"]), "templates": list(spec["templates"]),
                                                  "held_out": spec["held_out"]}, indent=1))
    return summary


# ---------------------------------------------------------------------------------------------- training sources

def _media_dataset(kind: str, csv_path: Path, d: Any, preprocess: Any):
    """The CSV reader for a video or audio table, set up from a DataConfig (frames, fps, mel bins, frames of audio)."""
    from .fbank import FbankConfig
    from .media import CsvAudioText, CsvVideoText

    if kind == "video":
        return CsvVideoText(csv_path, preprocess, frames=d.frames, fps=d.fps or None)
    return CsvAudioText(csv_path, FbankConfig(num_mel_bins=d.mel_bins, max_length=d.audio_frames))


def _written(name: str, d: Any, preprocess: Any) -> Path:
    """The dataset's directory (data.path), written there first when it holds no train.csv yet."""
    path = Path(d.path or f"runs/data/{name}")
    if not (path / "train.csv").is_file():
        write_media_dataset(name, path, train=d.train_size, val=d.eval_size, novel=d.eval_size, seed=d.seed,
                            frames=max(8, min(16, d.frames)), image_size=preprocess.image_size)
    return path


def generated_train(name: str) -> Callable[[Any, Any], Any]:
    return lambda d, pre: _media_dataset(DATASETS[name]["column"], _written(name, d, pre) / "train.csv", d, pre)


def generated_evaluation(name: str) -> Callable[[Any, Any], tuple[list, list]]:
    """Zero-shot sets of the val and novel splits: (name_split, media array, labels, class names, templates)."""

    def evaluation(d: Any, preprocess: Any) -> tuple[list, list]:
        path = _written(name, d, preprocess)
        spec = json.loads((path / "classes.json").read_text())
        column = DATASETS[name]["column"]
        sets = []
        for split in ("val", "novel"):
            if not (path / f"{split}.csv").is_file():
                continue
            ds = _media_dataset(column, path / f"{split}.csv", d, preprocess)
            items = [x for x in (ds[i] for i in range(min(len(ds), d.eval_size))) if "bad" not in x]
            sets.append((f"{name.replace('-', '_')}_{split}", np.stack([x[column] for x in items]),
                         [x["label"] for x in items], tuple(spec["classes"]), tuple(spec["templates"])))
        return sets, []

    return evaluation


def csv_train(column: str) -> Callable[[Any, Any], Any]:
    return lambda d, pre: _media_dataset(column, Path(d.path), d, pre)


def tar_train(column: str) -> Callable[[Any, Any], Any]:
    """Tar shards (`data.path` a glob) of videos or audio clips with .txt captions."""
    from .fbank import FbankConfig
    from .media import TarMediaText

    return lambda d, pre: TarMediaText(d.path, column, pre, frames=d.frames, fps=d.fps or None,
                                       features=FbankConfig(num_mel_bins=d.mel_bins, max_length=d.audio_frames))
