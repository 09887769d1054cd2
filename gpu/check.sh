#!/usr/bin/env bash
# The GPU check: one command on a machine with CUDA torch and no network, from the offline bundle (make
# gpu-bundle builds .gpukit/; carry it with the working tree). Four stages, each with its own time limit, so one
# failure does not stop the rest; everything lands under OUT_DIR, with a one-screen summary.txt.
#
#   gpu/check.sh OUT_DIR                      on the GPU: ≤ 8 minutes on one H100/H200-class GPU
#   gpu/check.sh OUT_DIR --device cpu --tiny  the same plumbing on CPU with tiny shapes (make test runs it)
#
# 0. install: pip install --no-index --no-deps --target OUT_DIR/site from .gpukit (nothing is downloaded)
# 1. probe: versions, the bitsandbytes binary, NF4 matmul forward and backward, a paged 8-bit AdamW step, NVML
# 2. pytest -m gpu (tests/test_gpu.py; skipped without CUDA)
# 3. the GPU suite (suites/gpu_check.yaml: 135M, 1B and 8B shapes, the four methods, random weights)
# 4. the report (OUT_DIR/results/report.html) and summary.txt
# Environment: PYTHON (default python3: the image's), FTBENCH_GPUKIT (default .gpukit beside this script's repo).
set -u
if [ $# -lt 1 ]; then echo "usage: gpu/check.sh OUT_DIR [--device cpu|cuda] [--tiny]" >&2; exit 2; fi
OUT=$(mkdir -p "$1" && cd "$1" && pwd); shift
DEVICE=cuda; TINY=0
while [ $# -gt 0 ]; do
  case "$1" in
    --device) DEVICE=${2:?--device needs cpu or cuda}; shift 2 ;;
    --tiny) TINY=1; shift ;;
    *) echo "gpu/check.sh: unknown option $1" >&2; exit 2 ;;
  esac
done
REPO=$(cd "$(dirname "$0")/.." && pwd)
KIT=${FTBENCH_GPUKIT:-$REPO/.gpukit}
PY=${PYTHON:-python3}
SITE="$OUT/site"
if [ ! -f "$KIT/requirements.txt" ]; then echo "gpu/check.sh: no bundle at $KIT (make gpu-bundle)" >&2; exit 2; fi
: > "$OUT/stages.txt"

stage() {  # stage NAME SECONDS CMD...: run CMD under its own time limit, its output in OUT_DIR/NAME.log
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS
  timeout --kill-after=15 "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  local what=ok; [ $rc -ne 0 ] && what="FAILED (exit $rc)"; [ $rc -eq 124 ] && what="TIMED OUT after ${limit}s"
  printf '%-8s %-26s %4ss  %s\n' "$name" "$what" $((SECONDS - t0)) "$OUT/$name.log" >> "$OUT/stages.txt"
  return $rc
}

export PY SITE KIT OUT
gk_install() {  # functions run under `timeout` through bash -c, so they are exported
  rm -rf "$SITE"
  "$PY" -m pip install -q --no-index --no-deps --disable-pip-version-check --target "$SITE" \
    --find-links "$KIT/wheels" -r "$KIT/requirements.txt" && cp -r "$KIT/extra/." "$SITE/"
}
gk_report() {
  "$PY" -m harness report "$OUT/results" && "$PY" -m harness report "$OUT/results" --format md > "$OUT/report.md"
}
export -f gk_install gk_report
stage install 30 bash -c gk_install

# The bundle first on the path: its pydantic, peft, plotly and bitsandbytes win over any the image has.
export PYTHONPATH="$SITE:$REPO${FTBENCH_EXTRA_PATH:+:$FTBENCH_EXTRA_PATH}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1
export XDG_CACHE_HOME="$OUT/cache" MPLCONFIGDIR="$OUT/cache"
cd "$REPO" || exit 2

stage probe 60 "$PY" gpu/probe.py --device "$DEVICE" --out "$OUT/probe.json"

stage pytest 120 "$PY" -m pytest -q -m gpu -p no:cacheprovider tests/test_gpu.py

SUITE=suites/gpu_check.yaml
SUITE_LIMIT=240
if [ "$TINY" = 1 ]; then  # the same suite's shape on a 2-layer Llama of random weights, a few steps
  SUITE="$OUT/gpu_check_tiny.yaml"
  SUITE_LIMIT=180
  "$PY" - "$SUITE" "$OUT/tiny-shape" <<'EOF'
import json, pathlib, sys, yaml
suite, folder = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
folder.mkdir(parents=True, exist_ok=True)
(folder / "config.json").write_text(json.dumps({
    "model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
    "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 30522, "max_position_embeddings": 256}))
data = yaml.safe_load(pathlib.Path("suites/gpu_check.yaml").read_text())
data.update(name="gpu_check_tiny", models=[{"name": str(folder), "init": "random"}], timeout_s=200)
data["train"].update(steps=3, batch_size=2, max_seq_len=32, timing_warmup_steps=1, dtype="float32")
for m in data["methods"]:
    m.get("config", {}).pop("compute_dtype", None)
    m.get("train", {}).pop("optimizer", None)  # paged optimizers do not page on a CPU
suite.write_text(yaml.safe_dump(data, sort_keys=False))
EOF
fi
stage suite "$SUITE_LIMIT" "$PY" -m harness run "$SUITE" --results "$OUT/results" --device "$DEVICE"

stage report 30 bash -c gk_report

{
  echo "ftbench GPU check · $(date -u +%Y-%m-%dT%H:%M:%SZ) · device $DEVICE$([ "$TINY" = 1 ] && echo ' (tiny dry run)')"
  "$PY" - "$OUT/probe.json" <<'EOF'
import json, sys
try:
    p = json.load(open(sys.argv[1]))
except (OSError, ValueError):
    sys.exit(print("probe: no result (see probe.log)"))
v, d = p.get("versions", {}), p.get("device_info", {})
ver = lambda k: (v.get(k) or {}).get("version", "missing") if isinstance(v.get(k), dict) else v.get(k)
print(f"device: {d.get('device')} {d.get('capability', '')} {d.get('memory_gib', '')} GiB · python {v.get('python')} · "
      f"torch {ver('torch')} (CUDA {v.get('torch_cuda')}) · transformers {ver('transformers')} · peft {ver('peft')} · "
      f"bitsandbytes {ver('bitsandbytes')}")
for k in ("bitsandbytes_binary", "nf4_matmul", "paged_adamw_8bit", "nvml", "energy_counter"):
    x = p.get(k, {})
    print(f"  {k}: " + (x["error"] if "error" in x else ", ".join(f"{a}={b}" for a, b in x.items() if a != "pids_seen")))
EOF
  echo "stages:"
  cat "$OUT/stages.txt"
  "$PY" -m harness summary "$OUT/results" 2>&1 | head -60
} > "$OUT/summary.txt" 2>&1
cat "$OUT/summary.txt"
! grep -q "FAILED\|TIMED OUT" "$OUT/stages.txt"
