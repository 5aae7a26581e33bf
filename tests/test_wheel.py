"""The package as a user gets it: `python -m build` makes an sdist and a wheel (the wheel built from the sdist, so the
sdist carries what the wheel needs), the wheel installs into a fresh venv (not editable), and from another
directory `mmlm --help`, `mmlm recipes`, a tiny `mmlm quickstart --no-llava`, the compiled loops' first build and every
public name and module work.

Slow (about a minute and a half on 2 cores, most of it pip installing torch and the dependencies into the new
venv); `make test` runs it, `make test-fast` does not. The venv gets the torch the Makefile installs (`TORCH`, a
local wheel on our machines) or, outside make, the version running the tests.
"""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow

# Optional dependencies (the serve / interop / dev extras and what they bring): a module of mmlm may need them,
# the base wheel does not.
EXTRAS = {"fastapi", "pydantic", "starlette", "uvicorn", "httpx", "transformers", "gguf", "openai", "selenium",
          "schemathesis"}

CHECK = r"""
import importlib, pkgutil, sys
from pathlib import Path
import mmlm

site = Path(sys.argv[1])
assert Path(mmlm.__file__).resolve().is_relative_to(site), f"mmlm imported from {mmlm.__file__}, not the venv"
for name in mmlm.__all__:
    assert getattr(mmlm, name) is not None, name
extras, skipped = set(sys.argv[2].split(",")), []
for info in pkgutil.walk_packages(mmlm.__path__, "mmlm."):
    if info.name.endswith("__main__"):
        continue
    try:
        importlib.import_module(info.name)
    except ModuleNotFoundError as e:
        if e.name.split(".")[0] not in extras:
            raise
        skipped.append(f"{info.name} (needs {e.name})")

final = Path("qs/run/final")
model, tok = mmlm.load(final), mmlm.load_tokenizer(final)
emb = model.encode_text(tok(["a red circle"], context_length=model.config.text.context_length))
assert emb.shape == (1, model.config.embed_dim), emb.shape
print("public names:", ", ".join(mmlm.__all__))
print("modules needing an extra:", ", ".join(skipped) or "none")
"""


def _run(argv: list[str], cwd: Path, env: dict[str, str], timeout: float) -> str:
    p = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, (f"{' '.join(map(str, argv))} failed ({p.returncode}):\n"
                               f"{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    return p.stdout


def test_the_wheel_installs_into_a_fresh_venv_and_runs(tmp_path):
    import torch

    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    env.update(OMP_NUM_THREADS="1", PYTHONDONTWRITEBYTECODE="1")  # pytest -n 2: leave the other core alone
    dist, venv, work = tmp_path / "dist", tmp_path / "venv", tmp_path / "elsewhere"
    work.mkdir()

    _run([sys.executable, "-m", "build", "--outdir", str(dist), str(REPO)], tmp_path, env, 600)
    wheels, sdists = list(dist.glob("mmlm-*.whl")), list(dist.glob("mmlm-*.tar.gz"))
    assert len(wheels) == 1 and len(sdists) == 1, sorted(dist.iterdir())

    _run([sys.executable, "-m", "venv", str(venv)], tmp_path, env, 300)
    py, mmlm = venv / "bin" / "python", venv / "bin" / "mmlm"
    _run([str(py), "-m", "pip", "install", "-q", os.environ.get("TORCH") or f"torch=={torch.__version__}"],
         work, env, 900)
    _run([str(py), "-m", "pip", "install", "-q", str(wheels[0])], work, env, 900)
    site = _run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], work, env, 60).strip()
    assert not list(Path(site).glob("__editable__*")), "the venv holds an editable install"

    assert "quickstart" in _run([str(mmlm), "--help"], work, env, 120)
    listed = _run([str(mmlm), "recipes"], work, env, 120)
    assert "clip-shapes " in listed and "llava-shapes " in listed
    copied = Path(_run([str(mmlm), "recipes", "copy", "llava-shapes", "--out", "mine"], work, env, 120).strip())
    with zipfile.ZipFile(wheels[0]) as whl:
        assert (work / copied).read_bytes() == whl.read("mmlm/recipes/llava-shapes.yaml")

    # The packaged clip-shapes recipe, found by name, on a tiny setting.
    _run([str(mmlm), "quickstart", "--no-llava", "--out", "qs", "--steps", "4", "--eval-size", "16",
          "data.eval_size=16", "train.batch_size=16", "train.num_workers=0", "train.progress=false"], work, env, 600)
    assert (work / "qs" / "run" / "report.md").is_file() and (work / "qs" / "eval.json").is_file()

    # The C loops travel as source and build on first use, here into a cache of the test's own.
    with zipfile.ZipFile(wheels[0]) as whl:
        assert "mmlm/csrc/weight_only.c" in whl.namelist()
    built = _run([str(py), "-c", "from mmlm import native; lib = native.kernels(); "
                  "print('built' if lib is not None else native.error())"], work,
                 {**env, "MMLM_CACHE": str(tmp_path / "cache")}, 300)
    assert built.strip() == "built" and list((tmp_path / "cache" / "native").glob("*.so")), built

    out = _run([str(py), "-c", CHECK, site, ",".join(sorted(EXTRAS))], work, env, 300)
    print(out)
