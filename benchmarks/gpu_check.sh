#!/usr/bin/env bash
# The GPU checks of one session on a CUDA machine, as one script: the CUDA tests, the ImageNet-size
# step speed (bench_methods.py), and the small-folder rows over three seeds (small_folder.py).
# Output under $OUT (default ./gpu_out). Python packages missing there can be installed from
# wheels in .whl/ (pure-Python omegaconf, for instance); the repo's src/ is put on PYTHONPATH.
set -u
OUT=${OUT:-gpu_out}; mkdir -p "$OUT"
SEEDS_DEADLINE=${SEEDS_DEADLINE:-240}; SEEDS_TIMEOUT=${SEEDS_TIMEOUT:-330}
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
python3 -c "import torch, s2bnn; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"
python3 -m s2bnn.deploy._build >/dev/null 2>&1 || echo "no packed kernels here"
timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py 2>&1 | tee "$OUT/test_cuda.log" | tail -15
for prec in bf16 fp32; do
  timeout 60 python3 benchmarks/bench_methods.py --preset imagenet --device cuda --steps 10 \
    $([ $prec = bf16 ] && echo --bf16) 2>&1 | tee "$OUT/bench_imagenet_$prec.txt"
done
timeout "$SEEDS_TIMEOUT" python3 benchmarks/small_folder.py --store gpu --device cuda \
  --seeds 0 1 2 --jobs 6 --deadline "$SEEDS_DEADLINE" > "$OUT/small_folder.log" 2>&1
grep "^== " "$OUT/small_folder.log"
# A run cut short by its timeout has not written the doc yet: write it from the JSON.
python3 benchmarks/small_folder.py --store gpu --report
cp docs/results/small_folder_gpu.json docs/SMALL_FOLDER_SEEDS.md "$OUT/"
sed -n '/^| row/,/^$/p' docs/SMALL_FOLDER_SEEDS.md
