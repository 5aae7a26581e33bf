"""The command line end to end on tiny settings: data, eval, quickstart (smoke), error messages."""

from __future__ import annotations

import json

import pytest
import torch

import mmlm
from mmlm.cli import main
from mmlm.config import clip_preset
from mmlm.models.clip import CLIP


def test_data_shapes_then_eval_on_the_written_csv(tmp_path, capsys):
    assert main(["data", "shapes", "--out", str(tmp_path / "shapes"), "--train", "8", "--val", "24", "--novel", "8",
                 "--image-size", "32"]) == 0
    capsys.readouterr()
    from mmlm.tokenizer import Tokenizer

    cfg = clip_preset("tiny-vit")
    tok = Tokenizer.train_bpe(["a red circle", "a blue star"] * 10, vocab_size=600, context_length=16)
    cfg.text.vocab_size, cfg.text.eot_token_id = tok.vocab_size, tok.eot_id
    mmlm.save(CLIP(cfg), tmp_path / "model", tokenizer=tok)
    assert main(["eval", "retrieval", "--model", str(tmp_path / "model"), "--data", str(tmp_path / "shapes" / "val.csv")]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["images"] == 24 and 0 <= result["i2t_R@1"] <= 1 and result["skipped"] == []
    assert main(["eval", "zeroshot", "--model", str(tmp_path / "model"),
                 "--data", str(tmp_path / "shapes" / "val_zeroshot.csv")]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["n"] == 24 and len(result["confusion"]) == result["classes"]


def test_user_errors_are_one_line_messages(tmp_path, capsys):
    assert main(["eval", "zeroshot", "--model", str(tmp_path / "nope"), "--data", "shapes"]) == 2
    assert "no such file or directory" in capsys.readouterr().err
    (tmp_path / "r.yaml").write_text("train: {stpes: 3}\n")
    assert main(["train", "clip", "--config", str(tmp_path / "r.yaml"), "--out", str(tmp_path / "run")]) == 2
    assert "unknown field(s) ['stpes']" in capsys.readouterr().err
    assert main(["train", "clip", "--out", str(tmp_path / "run"), "train.lr=oops"]) == 2


def test_generate_writes_pngs_and_bad_flags_are_named(tmp_path, capsys):
    from PIL import Image

    from mmlm.serve.tiny import tiny_text_to_image

    model = str(tiny_text_to_image(tmp_path / "t2i"))
    out = str(tmp_path / "img.png")
    assert main(["generate", "--model", model, "--prompt", "a red circle", "--out", out, "--steps", "1",
                 "--size", "32x16"]) == 0
    assert Image.open(out).size == (32, 16)
    capsys.readouterr()
    for flags, named in [(["--steps", "0"], "--steps"), (["--steps", "10000"], "--steps"),
                         (["--guidance", "nan"], "--guidance"), (["--guidance", "inf"], "--guidance"),
                         (["--size", "banana"], "--size"), (["--size", "17x16"], "--size"),
                         (["--size", "99999x16"], "--size"), (["--n", "0"], "--n"), (["--prompt", " "], "--prompt")]:
        assert main(["generate", "--model", model, "--prompt", "x", "--out", out, *flags]) == 2, flags
        err = capsys.readouterr().err
        assert named in err and err.count("\n") == 1, (flags, err)


@pytest.mark.slow
def test_quickstart_smoke(tmp_path):
    from mmlm.quickstart import quickstart

    result = quickstart(tmp_path / "qs", steps=4, eval_size=16, llava_steps=(3, 3),
                        overrides=["data.eval_size=16", "train.num_workers=0", "train.progress=false"])
    assert (tmp_path / "qs" / "run" / "report.md").is_file()
    for name in ("loss.png", "eval.png", "confusion_seen.png", "similarity.png"):
        assert (tmp_path / "qs" / "run" / name).is_file(), name
    assert set(result) >= {"zeroshot_seen", "zeroshot_novel", "retrieval", "report", "llava"}
    llava = result["llava"]
    assert (tmp_path / "qs" / "llava-s2" / "answers.png").is_file()
    assert "Answered questions" in (tmp_path / "qs" / "llava-s2" / "report.md").read_text()
    assert 0.0 <= llava["vqa_val"]["accuracy"] <= 1.0 and "count" in json.dumps(llava)


@pytest.mark.slow
def test_quickstart_generation_stage_trains_judges_and_reports(tmp_path):
    from mmlm.quickstart_generation import quickstart_generation
    from mmlm.serve.tiny import tiny_clip

    clip = tiny_clip(tmp_path / "clip")
    tiny = ["train.batch_size=4", "train.num_workers=0", "train.progress=false", "data.train_size=32",
            "model.unet.block_out_channels=[16,32]", "model.unet.cross_attention=[false,true]", "model.unet.heads=2",
            "model.unet.sample_size=24"]
    result = quickstart_generation(tmp_path / "qs", clip, overrides=tiny, steps=2, per_group=2, sample_steps=2)
    run = tmp_path / "qs" / "diffusion"
    assert (run / "final" / "ema.safetensors").is_file() and (run / "generation_grid.png").is_file()
    report = (run / "report.md").read_text()
    assert "generation_grid.png" in report and "loss.png" in report and "one_object_seen_pairs" in report
    assert 0 <= result["one_object_novel_pairs"]["shape"] <= 1
    assert result["frechet"]["rendered_vs_rendered"] >= 0


def test_the_judge_reads_colour_and_shape_from_the_best_pair():
    """Colour: the colour of the best pair over all shapes; shape: the shape of the best pair over all colours (not
    the best mean), other attributes from their own classifiers."""
    from mmlm.data.shapes import COLOURS, SHAPES
    from mmlm.eval.generation import ATTRIBUTES, judge_attributes

    g = torch.Generator().manual_seed(0)
    pairs = torch.nn.functional.normalize(torch.randn(len(COLOURS) * len(SHAPES), 512, generator=g), dim=-1)
    others = {name: torch.eye(512)[:len(values)] for name, (values, template) in ATTRIBUTES.items() if template}
    rows = [0, 9, 63, 8 * 3 + 5]  # (colour, shape) = (0, 0), (1, 1), (7, 7), (3, 5)
    tops = judge_attributes(pairs[rows], pairs, others)
    assert set(tops) == set(ATTRIBUTES)
    assert tops["colour"] == [0, 1, 7, 3] and tops["shape"] == [0, 1, 7, 5]
    # one image near a single pair (2, 6) but with every other pair of colour 4 a little closer than average:
    # the best pair decides, a mean over the shapes would pick colour 4
    f = pairs[2 * 8 + 6] + 0.45 * pairs[4 * 8:4 * 8 + 8].sum(0) - 0.45 * pairs[4 * 8 + 6]
    f = torch.nn.functional.normalize(f, dim=-1)[None]
    by_pair = (f @ pairs.T).view(8, 8)
    assert by_pair.mean(1).argmax() == 4  # what averaging would read
    tops = judge_attributes(f, pairs, others)
    assert (tops["colour"], tops["shape"]) == ([2], [6])


def test_eval_generation_structure_and_real_floor(tmp_path, capsys):
    from mmlm.eval.generation import ATTRIBUTES, GROUPS, frechet_distance
    from mmlm.serve.tiny import tiny_clip, tiny_text_to_image

    model, judge = tiny_text_to_image(tmp_path / "run" / "final"), tiny_clip(tmp_path / "judge")
    assert main(["eval", "generation", "--model", str(model), "--judge", str(judge), "--limit", "2",
                 "--steps", "1"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["images"] == 2 * len(GROUPS) == 12
    assert set(result["groups"]) == {f"{s}-{n}" for s, n in GROUPS}
    assert set(result["attributes"]) == set(ATTRIBUTES)
    assert all(0 <= v <= 1 for g in result["groups"].values() for k, v in g.items() if k not in ("prompts", "real"))
    assert set(result["real_attributes"]) == set(ATTRIBUTES)  # the judge on the rendered scenes: the ceiling
    assert all(0 <= v <= 1 for g in result["groups"].values() for v in g["real"].values())
    assert result["frechet"] >= 0 and result["frechet_real_floor"] >= 0
    assert (tmp_path / "run" / "generation_grid.png").is_file() and (tmp_path / "run" / "generation.json").is_file()
    assert main(["eval", "generation", "--model", str(model)]) == 2
    assert "--judge" in capsys.readouterr().err
    x = torch.randn(64, 4, generator=torch.Generator().manual_seed(0))
    assert abs(frechet_distance(x, x)) < 1e-9
    assert frechet_distance(x, x + 1) == pytest.approx(4.0, abs=1e-6)  # a shift of the mean by 1 in 4 dims
