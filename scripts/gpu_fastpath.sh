#!/usr/bin/env bash
# The GPU fast path's checks and figures in one run (issue: GPU fast path), for a machine with one CUDA GPU.
#
#     bash scripts/gpu_fastpath.sh [OUT_DIR]        (about 8-10 minutes on an H100/H200; JSON in OUT_DIR)
#
# Most important first, so a run cut short still has the headline figures:
# 1. quick correctness: the Triton kernels against torch_ref, CUDA graphs against eager
# 2. the attention kernel's bandwidth: decode at batch 256, context 1024, GQA 8:1, head_dim 64
# 3. the step profile: pure decode at batch 256 on the TinyLlama-1.1B shape (wall vs GPU busy, host waits),
#    with async scheduling (the CUDA default) and one step at a time
# 4. throughput: the nanovllm workload on the TinyLlama-1.1B shape (bf16, dummy weights), async scheduling on
#    and off side by side, beside HF static batching on its first 32 requests; GPT-2 124M beside HF static(16)
# 5. greedy output against HF (scripts/check_cuda.py: graphs + async scheduling, then eager one step at a time)
# 6. launch-setting sweep, unfused / eager profiles, every attention case
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-${OUT:-/tmp/gpu_fastpath}}
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
TINY=pagellm/benchmarks/configs/tinyllama-1.1b
GPT2=pagellm/benchmarks/configs/gpt2-124m
step() { echo; echo "== $*"; }

step "device"; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
$PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
$PY -c "import importlib.util as u; m = [n for n in ('transformers', 'tokenizers', 'safetensors', 'psutil', 'jinja2',
    'tqdm', 'pytest') if u.find_spec(n) is None]; print('missing Python packages (carry them as wheels):', m) if m else None"

step "kernels and graphs, quick (pytest: plain attention on 3 shapes, graphs vs eager, fused elementwise)"
timeout 180 $PY -m pytest -q -p no:cacheprovider tests/worker/test_attention_backends.py \
    tests/worker/test_cuda_graphs.py tests/models/test_triton_ops.py \
    -k "gpu or kernels_on_cuda or (cuda and None-None and (case0 or case1 or case2))" 2>&1 | tail -8

step "attention kernel bandwidth"
$PY -m pagellm bench attention --device cuda --batch-size 256 --context-len 1024 --num-heads 32 --num-kv-heads 4 \
    --head-dim 64 --dtype bfloat16 --backend triton_paged --output-json "$OUT/attention_b256.json"
$PY -m pagellm bench attention --device cuda --batch-size 8 --context-len 4096 --num-heads 32 --num-kv-heads 4 \
    --head-dim 64 --dtype bfloat16 --backend triton_paged --output-json "$OUT/attention_b8.json"

step "step profile: decode at batch 256, TinyLlama-1.1B shape (async scheduling on, then off)"
$PY -m pagellm bench profile --model $TINY --load-format dummy --dtype bfloat16 --device cuda --batch-size 256 \
    --input-len 250 --steps 20 --output-json "$OUT/profile_tinyllama.json"
$PY -m pagellm bench profile --model $TINY --load-format dummy --dtype bfloat16 --device cuda --batch-size 256 \
    --input-len 250 --steps 20 --top 5 --no-async-scheduling --output-json "$OUT/profile_tinyllama_sync.json"

step "throughput: nanovllm workload, TinyLlama-1.1B shape, bf16 (async scheduling on; off as a variant)"
timeout 300 $PY -m pagellm bench throughput --model $TINY --load-format dummy --dtype bfloat16 --device cuda \
    --workload nanovllm --compare hf --hf-num-prompts 32 --skip-hf-single --bound \
    --variant async_scheduling=false --output-json "$OUT/throughput_tinyllama_nanovllm.json"

step "throughput: GPT-2 124M default workload"
timeout 200 $PY -m pagellm bench throughput --model $GPT2 --load-format dummy --dtype float32 --device cuda \
    --compare hf --skip-hf-single --output-json "$OUT/throughput_gpt2_cuda.json"

step "greedy output vs HF on the GPU (graphs + async scheduling; eager, one step at a time)"
timeout 200 $PY scripts/check_cuda.py
timeout 200 $PY scripts/check_cuda.py --enforce-eager --no-async-scheduling

step "attention launch settings (tile, warps, stages), decode at batch 256"
$PY -m pagellm bench attention --device cuda --batch-size 256 --context-len 1024 --num-heads 32 --num-kv-heads 4 \
    --head-dim 64 --dtype bfloat16 --backend triton_paged --tile-n 16,32,64 --num-warps 2,4,8 --num-stages 2,3 \
    --iters 10 --output-json "$OUT/attention_sweep.json"

step "profiles without the fused elementwise kernels, then without CUDA graphs"
PAGELLM_FUSED_ELEMENTWISE=0 $PY -m pagellm bench profile --model $TINY --load-format dummy --dtype bfloat16 \
    --device cuda --batch-size 256 --input-len 250 --steps 20 --top 5 --output-json "$OUT/profile_tinyllama_unfused.json"
$PY -m pagellm bench profile --model $TINY --load-format dummy --dtype bfloat16 --device cuda --batch-size 256 \
    --input-len 250 --steps 20 --top 5 --enforce-eager --output-json "$OUT/profile_tinyllama_eager.json"

step "every attention case on the GPU (windows, soft-cap, head sizes, fp8; many kernel compilations)"
timeout 300 $PY -m pytest -q -p no:cacheprovider tests/worker/test_attention_backends.py -k cuda 2>&1 | tail -8
