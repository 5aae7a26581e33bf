"""ResNet or ViT? Both CLIP image towers trained with the same budget, on the same data, then compared.

The claim under test (the course chapter mmlm grew from): a ResNet suits small data, limited compute and
local features; a ViT suits large data and global relations.

Design (docs/03-resnet-or-vit.md explains it):
- two towers with about the same forward FLOPs per image: CLIP's ModifiedResNet of configs/clip-shapes.yaml
  (width 32, one bottleneck per stage) and the patch-8 ViT of configs/clip-shapes-vit.yaml (width 128, 4 layers);
  the same text tower, tokenizer, optimiser, learning rate and schedule; 64 px images everywhere;
- an equal *step* budget (same batch size, same number of steps, so the same images seen); wall-clock reported;
- two datasets, each at a small and a large training set: shapes (generated) and Fashion-MNIST (real photos);
- local vs global on shapes: linear probes on the frozen image embedding for colour and shape (local: what is
  inside one object's cell) and for position and object count (global: where an object sits in the whole image,
  how many objects the whole image holds); Fashion-MNIST: a class probe. Zero-shot accuracy for both datasets.

Run (1 torch thread, ~25 min on a shared 2-core CPU):
    python benchmarks/resnet_vs_vit.py --out docs/figures
Writes OUT/resnet_vs_vit.md (the table), OUT/resnet_vs_vit.json and OUT/resnet_vs_vit.png. Finished runs under
--runs are reused, so an interrupted benchmark continues where it stopped.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from torch.utils.data import Subset

from mmlm.data.image_text import ArrayImageText
from mmlm.data.transforms import ImageProcessor, PreprocessConfig
from mmlm.eval.zeroshot import image_embeddings, zeroshot
from mmlm.formats import load as load_model
from mmlm.formats import load_tokenizer
from mmlm.models.clip import CLIP
from mmlm.train.clip_run import build_tokenizer, fit_text_to_tokenizer, train_data
from mmlm.train.clip_task import ClipTask
from mmlm.train.loop import train
from mmlm.train.recipes import run_config_from_dict

ROOT = Path(__file__).resolve().parents[1]
IMAGE_SIZE = 64
TOWERS = {
    "ResNet": {"kind": "modified_resnet", "image_size": IMAGE_SIZE, "layers": [1, 1, 1, 1], "width": 32},
    "ViT": {"kind": "vit", "image_size": IMAGE_SIZE, "patch_size": 8, "width": 128, "layers": 4, "heads": 4},
}
RECIPES = {"shapes": "configs/clip-shapes.yaml", "fashion_mnist": "configs/clip-fashion-mnist.yaml"}


# ----------------------------------------------------------------------------- training

def run_config(dataset: str, tower: str, steps: int, batch_size: int):
    raw = yaml.safe_load((ROOT / RECIPES[dataset]).read_text())
    raw["model"] = {**raw["model"], "vision": dict(TOWERS[tower])}
    raw["train"].update(steps=steps, batch_size=batch_size, warmup_steps=max(1, steps // 10), eval_every=0,
                        ckpt_every=0, num_workers=0, threads=1, progress=False, log_every=max(1, steps // 10))
    return run_config_from_dict("clip", raw)


def training_set(cfg, dataset: str, size: int, preprocess: PreprocessConfig):
    """The recipe's training data, cut to `size` images (shapes: `size` generated scenes)."""
    if dataset == "shapes":
        cfg.data.train_size = size
        return train_data(cfg, preprocess)
    full = train_data(cfg, preprocess)  # ArrayImageText over all 60k Fashion-MNIST training images
    return ArrayImageText(Subset(full.base, range(min(size, len(full.base)))), preprocess)


def train_run(dataset: str, tower: str, size: int, steps: int, batch_size: int, run: Path) -> dict[str, Any]:
    """Train one CLIP (reusing a finished run); returns the model dir and the training wall time."""
    done = run / "bench_train.json"
    if done.is_file() and (run / "final" / "config.json").is_file():
        return json.loads(done.read_text())
    cfg = run_config(dataset, tower, steps, batch_size)
    preprocess = PreprocessConfig(image_size=IMAGE_SIZE)
    data = training_set(cfg, dataset, size, preprocess)
    shared = run.parent / f"{dataset}-tokenizer"  # one BPE per dataset, fitted on the recipe's caption corpus
    if (shared / "tokenizer.json").is_file():
        cfg.tokenizer.kind, cfg.tokenizer.path = "file", str(shared / "tokenizer.json")
    tok = build_tokenizer(cfg, data, run)
    if not (shared / "tokenizer.json").is_file():
        tok.save(shared)
    fit_text_to_tokenizer(cfg, tok)
    torch.manual_seed(cfg.train.seed)
    model = CLIP(cfg.model)
    start = time.perf_counter()
    summary = train(ClipTask(cfg, model, tok, data, preprocess), cfg.train, run, resume=False)
    seconds = time.perf_counter() - start
    out = {"train_seconds": round(seconds, 1), "samples_seen": summary["samples_seen"],
           "train_img_per_s": round(summary["samples_seen"] / seconds, 1)}
    done.write_text(json.dumps(out))
    return out


# ----------------------------------------------------------------------------- evaluation

def linear_probe(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor,
                 weight_decay: float = 1e-4, iters: int = 200) -> float:
    """Test accuracy of a multinomial logistic regression fitted (L-BFGS) on frozen features."""
    torch.manual_seed(0)
    n_classes = int(max(train_y.max(), test_y.max())) + 1
    mean, std = train_x.mean(0), train_x.std(0) + 1e-6
    xs, xt = (train_x - mean) / std, (test_x - mean) / std
    layer = torch.nn.Linear(xs.shape[1], n_classes)
    opt = torch.optim.LBFGS(layer.parameters(), lr=1.0, max_iter=iters, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(layer(xs), train_y) + weight_decay * layer.weight.square().sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        return round((layer(xt).argmax(-1) == test_y).float().mean().item(), 4)


def _batches(images: np.ndarray, processor: ImageProcessor, batch: int = 128):
    for i in range(0, len(images), batch):
        yield processor.normalize(torch.from_numpy(images[i:i + batch]), channels_last=True)


class EvalSets:
    """Evaluation images generated once and shared by every model (labels per probed attribute)."""

    def __init__(self, n_probe_train: int, n_test: int):
        self.n_probe_train, self.n_test = n_probe_train, n_test
        self.processor = ImageProcessor(PreprocessConfig(image_size=IMAGE_SIZE))
        self._cache: dict[str, Any] = {}

    def shapes(self, seed: int, n: int, single: bool) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        key = f"shapes-{seed}-{n}-{single}"
        if key not in self._cache:
            from mmlm.data.shapes import COLOURS, POSITIONS, SHAPES, ShapesDataset

            ds = ShapesDataset("val", n, seed, IMAGE_SIZE, single=single, n_questions=0)
            items = [ds[i] for i in range(n)]
            first = [it["scene"].objects[0] for it in items]
            labels = {"class": np.array([it["label"] for it in items]),
                      "colour": np.array([COLOURS.index(o.colour) for o in first]),
                      "shape": np.array([SHAPES.index(o.shape) for o in first]),
                      "position": np.array([POSITIONS.index(o.position) for o in first]),
                      "count": np.array([len(it["scene"].objects) - 1 for it in items])}
            self._cache[key] = (np.stack([it["image"] for it in items]), labels)
        return self._cache[key]

    def fashion(self, start: int, n: int) -> tuple[np.ndarray, np.ndarray]:
        key = f"fashion-{start}-{n}"
        if key not in self._cache:
            from mmlm.data.fashion_mnist import FashionMNISTDataset

            arr = ArrayImageText(Subset(FashionMNISTDataset("test"), range(start, start + n)), self.processor.config)
            items = [arr[i] for i in range(len(arr))]
            self._cache[key] = (np.stack([x["image"] for x in items]), np.array([x["label"] for x in items]))
        return self._cache[key]


def evaluate(model_dir: Path, dataset: str, sets: EvalSets) -> dict[str, float]:
    model, tok = load_model(model_dir), load_tokenizer(model_dir)
    proc, n_tr, n_te = sets.processor, sets.n_probe_train, sets.n_test

    def embed(images: np.ndarray) -> torch.Tensor:
        return image_embeddings(model, _batches(images, proc))

    out: dict[str, float] = {}
    if dataset == "shapes":
        from mmlm.data.shapes import CLASS_NAMES, TEMPLATES

        single_test, single_test_y = sets.shapes(1, n_te, True)
        single_train, single_train_y = sets.shapes(2, n_tr, True)
        multi_test, multi_test_y = sets.shapes(3, n_te, False)
        multi_train, multi_train_y = sets.shapes(4, n_tr, False)
        zs = zeroshot(model, tok, _batches(single_test, proc), torch.as_tensor(single_test_y["class"]),
                      CLASS_NAMES, TEMPLATES, with_confusion=False)
        out["zero-shot"] = zs["top1"]
        e_tr, e_te = embed(single_train), embed(single_test)
        for attr in ("colour", "shape", "position"):
            out[attr] = linear_probe(e_tr, torch.as_tensor(single_train_y[attr]), e_te,
                                     torch.as_tensor(single_test_y[attr]))
        out["count"] = linear_probe(embed(multi_train), torch.as_tensor(multi_train_y["count"]), embed(multi_test),
                                    torch.as_tensor(multi_test_y["count"]))
    else:
        from mmlm.data.fashion_mnist import CLASS_NAMES, TEMPLATES

        test, test_y = sets.fashion(0, n_te)
        train_imgs, train_y = sets.fashion(n_te, n_tr)  # probe fit on other test images, never on training ones
        zs = zeroshot(model, tok, _batches(test, proc), torch.as_tensor(test_y), CLASS_NAMES, TEMPLATES,
                      with_confusion=False)
        out["zero-shot"] = zs["top1"]
        out["class"] = linear_probe(embed(train_imgs), torch.as_tensor(train_y), embed(test), torch.as_tensor(test_y))
    return out


# ----------------------------------------------------------------------------- cost

def tower_cost(names: list[str], batch: int = 64, repeats: int = 5) -> dict[str, dict[str, float]]:
    """Parameters and forward FLOPs per image of each image tower, and its throughput on this machine (1 thread):
    training (forward + backward, bf16 autocast, as the runs train) and inference (fp32, no grad). The towers are
    timed alternately in one process and the median of `repeats` is kept, so machine load hits both alike."""
    from torch.utils.flop_counter import FlopCounterMode

    from mmlm.config import ModifiedResNetConfig, ViTConfig
    from mmlm.models.clip import build_vision_tower

    towers = {}
    for name in names:
        spec = dict(TOWERS[name])
        cfg = ModifiedResNetConfig(**spec) if spec["kind"] == "modified_resnet" else ViTConfig(**spec)
        towers[name] = build_vision_tower(cfg, 128)
    x = torch.randn(batch, 3, IMAGE_SIZE, IMAGE_SIZE)

    def train_step(m: torch.nn.Module) -> None:
        m.train()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            m(x).float().square().mean().backward()

    def infer(m: torch.nn.Module) -> None:
        m.eval()
        with torch.no_grad():
            m(x)

    out: dict[str, dict[str, float]] = {}
    for name, m in towers.items():
        with FlopCounterMode(display=False) as fc, torch.no_grad():
            m.eval()(x[:1])
        out[name] = {"params": sum(p.numel() for p in m.parameters()), "mflops": fc.get_total_flops() / 1e6}
    for kind, fn in (("train_img_per_s", train_step), ("infer_img_per_s", infer)):
        times: dict[str, list[float]] = {n: [] for n in towers}
        for m in towers.values():
            fn(m)  # warm up
        for _ in range(repeats):
            for name, m in towers.items():
                t = time.perf_counter()
                fn(m)
                times[name].append(time.perf_counter() - t)
        for name in towers:
            out[name][kind] = round(batch / statistics.median(times[name]), 1)
    return out


# ----------------------------------------------------------------------------- report

def write_table(results: list[dict[str, Any]], cost: dict[str, dict[str, float]], out: Path, steps: int,
                batch: int, cost_batch: int) -> str:
    lines = [f"Equal step budget: {steps} steps x batch {batch} = {steps * batch:,} images seen per run; 64 px; "
             "1 torch thread; bf16 autocast. Accuracies are fractions of the test images (chance: zero-shot 1/64 on "
             "shapes, 1/10 on Fashion-MNIST; colour, shape 1/8; position 1/9; count 1/3; class 1/10). Throughput: "
             f"the image tower alone, batch {cost_batch}, both towers timed alternately in one process (median of 5); "
             "wall s: each run's training time on a shared machine whose load varied, not comparable across rows.", "",
             "| data | train images | tower | params | MFLOPs / image | train img/s | infer img/s | zero-shot | colour "
             "| shape | position | count | class probe | wall s |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        m, c = r["metrics"], cost[r["tower"]]

        def cell(k: str) -> str:
            return f"{m[k]:.3f}" if k in m else ""

        lines.append(f"| {r['dataset']} | {r['size']:,} | {r['tower']} | {c['params'] / 1e6:.2f} M | {c['mflops']:.0f} | "
                     f"{c['train_img_per_s']:.0f} | {c['infer_img_per_s']:.0f} | {cell('zero-shot')} | {cell('colour')} | "
                     f"{cell('shape')} | {cell('position')} | {cell('count')} | {cell('class')} | "
                     f"{r['train_seconds']:.0f} |")
    lines += ["", "Towers: " + "; ".join(f"{name}: {_describe(name)}" for name in cost) + "."]
    text = "\n".join(lines) + "\n"
    (out / "resnet_vs_vit.md").write_text(text)
    return text


def _describe(tower: str) -> str:
    t = TOWERS[tower]
    if t["kind"] == "vit":
        return f"patch {t['patch_size']}, width {t['width']}, {t['layers']} layers"
    return f"ModifiedResNet width {t['width']}, blocks {t['layers']}"


def plot(results: list[dict[str, Any]], out: Path) -> None:
    from mmlm.report import pyplot

    plt = pyplot()
    groups = [(d, s) for d, s in dict.fromkeys((r["dataset"], r["size"]) for r in results)]
    fig, axes = plt.subplots(1, len(groups), figsize=(3.2 * len(groups), 3.0), squeeze=False)
    for ax, (dataset, size) in zip(axes[0], groups):
        rows = [r for r in results if r["dataset"] == dataset and r["size"] == size]
        keys = [k for k in rows[0]["metrics"]]
        width = 0.8 / len(rows)
        for j, r in enumerate(rows):
            ax.bar(np.arange(len(keys)) + j * width, [r["metrics"][k] for k in keys], width, label=r["tower"])
        ax.set_xticks(np.arange(len(keys)) + width * (len(rows) - 1) / 2, keys, rotation=45, fontsize=7)
        ax.set(ylim=(0, 1), title=f"{dataset}, {size:,} images")
        ax.title.set_fontsize(9)
    axes[0][0].legend(fontsize=7)
    axes[0][0].set_ylabel("accuracy")
    fig.tight_layout()
    fig.savefig(out / "resnet_vs_vit.png", dpi=80)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="docs/figures", help="where the table, JSON and figure go")
    p.add_argument("--runs", default="runs/resnet_vs_vit", help="training run directories (reused when finished)")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--datasets", default="shapes,fashion_mnist")
    p.add_argument("--sizes", default="2000,60000", help="small,large training-set sizes (images)")
    p.add_argument("--towers", default="ResNet,ViT")
    p.add_argument("--probe-train", type=int, default=2000, help="images the linear probes are fitted on")
    p.add_argument("--test", type=int, default=1000, help="test images per evaluation")
    p.add_argument("--cost-batch", type=int, default=64, help="batch for the inference-throughput measurement")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    out, runs = Path(args.out), Path(args.runs)
    out.mkdir(parents=True, exist_ok=True)
    sets = EvalSets(args.probe_train, args.test)
    results = []
    for dataset in args.datasets.split(","):
        for size in (int(s) for s in args.sizes.split(",")):
            for tower in args.towers.split(","):
                run = runs / f"{dataset}-{size}-{tower}"
                info = train_run(dataset, tower, size, args.steps, args.batch_size, run)
                cached = run / "bench_eval.json"  # reused when the evaluation settings match
                key = {"probe_train": args.probe_train, "test": args.test}
                if cached.is_file() and json.loads(cached.read_text())["key"] == key:
                    metrics = json.loads(cached.read_text())["metrics"]
                else:
                    metrics = evaluate(run / "final", dataset, sets)
                    cached.write_text(json.dumps({"key": key, "metrics": metrics}))
                results.append({"dataset": dataset, "size": size, "tower": tower, **info, "metrics": metrics})
                print(json.dumps(results[-1]), flush=True)
    cost = tower_cost(args.towers.split(","), batch=args.cost_batch)
    table = write_table(results, cost, out, args.steps, args.batch_size, args.cost_batch)
    plot(results, out)
    (out / "resnet_vs_vit.json").write_text(json.dumps({"args": vars(args), "results": results, "cost": cost}, indent=1))
    print(table)
    return {"results": results, "cost": cost}


if __name__ == "__main__":
    main()
