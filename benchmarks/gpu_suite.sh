#!/usr/bin/env bash
# Issue 13's accelerator figures in one run (about 8 minutes on one H200), logs in $OUT
# (default benchmarks/results/gpu_suite_<date>/):
#   1. ResNet-50 bf16 training throughput from the real input pipeline, with a 5-step profile
#      summarised by category (convolutions, BatchNorm, optimizer, augmentation, idle);
#   2. the whole grouped 5-fold study (30 epochs per fold, every evaluator, the report), from
#      a cold persistent compilation cache: goal 3 minutes or less;
#   3. torchvision ResNet-50 with channels_last, bf16 autocast and torch.compile on the same
#      batch and image size, where PyTorch is installed (it says so where it is not).
# Needs jax with CUDA, flax, optax, orbax-checkpoint, numpy, opencv, grain, clu and
# ml_collections; never TensorFlow. Usage: bash benchmarks/gpu_suite.sh
# A machine without network and without the pure-Python pieces: prepare the wheels where pip
# works, carry benchmarks/wheels/ along (about 4 MB, git-ignored), and this script installs
# from it:
#   pip download --no-deps -d benchmarks/wheels grain==0.2.18 array-record==0.8.6 \
#     clu==0.0.12 ml-collections==1.1.0 cloudpickle portpicker
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-benchmarks/results/gpu_suite_$(date +%Y%m%d)}"
mkdir -p "$OUT"
if ! python -c "import grain, clu, ml_collections" 2>/dev/null && [ -d benchmarks/wheels ]; then
  python -m pip install -q --no-index --find-links=benchmarks/wheels \
    grain array-record clu ml-collections cloudpickle portpicker
fi
python -c "import jax; print(jax.devices())" 2>&1 | tee "$OUT/devices.log"

timeout 240 python benchmarks/gpu.py --cells_per_class=810 --epochs=10 --profile \
  --workdir=/tmp/suite_gpu 2>&1 | tail -40 | tee "$OUT/gpu_throughput_profile.log"
timeout 420 python benchmarks/study.py --workdir=/tmp/suite_study 2>&1 | tail -30 \
  | tee "$OUT/study.log"
timeout 180 python benchmarks/torch_gpu.py 2>&1 | tail -5 | tee "$OUT/torch_gpu.log"
python - "$OUT" <<'EOF'
import json, sys
out = sys.argv[1]
def last_json(name):
    lines = [l for l in open(f"{out}/{name}") if l.startswith("{")]
    return json.loads(lines[-1]) if lines else None
ours = [json.loads(l) for l in open(f"{out}/gpu_throughput_profile.log") if l.startswith('{"device"')]
torch = last_json("torch_gpu.log")
if ours and torch:
    print(f"ours / PyTorch (torch.compile, bf16, channels_last): "
          f"{ours[-1]['images_per_s'] / torch['images_per_s']:.3f}")
EOF
