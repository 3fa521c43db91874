#!/usr/bin/env bash
# The GPU fast path's checks and figures (issue: GPU fast path), for a machine with one CUDA GPU.
#
#     bash scripts/gpu_fastpath.sh [OUT_DIR] [STAGE ...]
#
# With no stage named, every stage runs, most important first (about 10 minutes on an H100/H200), so a
# run cut short still has the headline figures. Each stage has its own time limit, its output goes to
# OUT_DIR/log.txt (JSON figures beside it), and a table of stage results is printed last.
#
# Stages:
#   info        the card, torch and Triton versions, missing Python packages
#   quick       pytest: the Triton kernels against torch_ref on 3 shapes, CUDA graphs against eager, fused elementwise
#   attention   the attention kernel's bandwidth: decode at batch 256, context 1024, GQA 8:1, head_dim 64 (and batch 8, 4k)
#   greedy      greedy output against HF (scripts/check_cuda.py) on a few architectures, graphs + async scheduling
#   profile     decode at batch 256 on the TinyLlama-1.1B shape: wall vs GPU busy, host waits, the host's hot
#               functions (async scheduling on); profile_sync: the same one step at a time
#   throughput  the nanovllm workload on the TinyLlama-1.1B shape (bf16, dummy weights) beside HF static batching,
#               and with 8 decode steps per scheduling round (multi-step decode)
#   multistep   profiles with 1, 4 and 8 decode steps per scheduling round; greedy output against HF with 4
#   nosync      the GPU test that steady decode steps never make the host wait
#   gemma2      Gemma 2 against HF layer by layer on the GPU, then greedy with graphs and eager
#   gpt2        GPT-2 124M default workload beside HF static(16), and with 8 decode steps per round
#   greedy_all  every test architecture against HF, graphs + async, then eager one step at a time
#   sweep       attention launch settings (tile, warps, stages); the stages after it run with the fastest
#               (PAGELLM_ATTENTION_LAUNCH, printed in the log)
#   ablations   profiles without the fused elementwise kernels, then without CUDA graphs
#   cases       every attention case on the GPU (windows, soft-cap, head sizes, fp8)
#   gpu_tests   every test that needs a CUDA GPU
#   spec        speculative decoding (n-gram drafts): greedy output against HF with 4 drafts per step, and the
#               demo model's speedup at batch 1 and 16 (pagellm bench speculative); then with a draft model (each
#               model as its own draft against HF; the demo model with its shipped 2-layer draft at batch 1)
#   lora        a random LoRA adapter on every projection against HF with it merged, CUDA graphs then eager
#   pooling     decoders as embedding models (mean / last-token pooling, chunked) and classifiers against HF
#   sleep       sleep mode on the GPU: device memory given back, CUDA graphs captured again, weight updates against HF;
#               then pagellm bench sleep on a TinyLlama-shape checkpoint (sleep / reload / update vs a cold start)
#   images      tiny LLaVA, LLaVA-NeXT, Qwen2-VL, Gemma 3 and Mistral 3 with image prompts (whole and chunked) against HF, graphs and eager
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-${OUT:-/tmp/gpu_fastpath}}
shift || true
mkdir -p "$OUT"
LOG=$OUT/log.txt
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
TINY=pagellm/benchmarks/configs/tinyllama-1.1b
GPT2=pagellm/benchmarks/configs/gpt2-124m
MODELS=tests/.models
SUMMARY=()

stage_info() {
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv,noheader
    $PY -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__,
'transformers', transformers.__version__)"
    $PY -c "import importlib.util as u; m = [n for n in ('transformers', 'tokenizers', 'safetensors', 'psutil',
'jinja2', 'tqdm', 'pytest') if u.find_spec(n) is None]; print('missing Python packages (carry them as wheels):', m)"
}
stage_quick() {
    $PY -m pytest -q -p no:cacheprovider -x tests/worker/test_attention_backends.py tests/worker/test_cuda_graphs.py \
        tests/models/test_triton_ops.py -k "gpu or kernels_on_cuda or (cuda and None-None and (case0 or case1 or case2))"
}
attn() { $PY -m pagellm bench attention --device cuda --num-heads 32 --num-kv-heads 4 --head-dim 64 --dtype bfloat16 \
    --backend triton_paged "$@"; }
stage_attention() {
    attn --batch-size 256 --context-len 1024 --output-json "$OUT/attention_b256.json" &&
    attn --batch-size 8 --context-len 4096 --output-json "$OUT/attention_b8.json"
}
stage_greedy() {
    $PY scripts/check_cuda.py $MODELS/llama $MODELS/gpt2 $MODELS/gpt_bigcode $MODELS/gemma2 $MODELS/mistral \
        $MODELS/qwen3 $MODELS/mixtral pagellm/assets/shakespeare-llama
}
profile() { $PY -m pagellm bench profile --model $TINY --load-format dummy --dtype bfloat16 --device cuda \
    --batch-size 256 --input-len 250 --steps 20 --top 8 "$@"; }
stage_profile() {
    profile --host-top 30 --output-json "$OUT/profile_tinyllama.json"
}
stage_profile_sync() {
    profile --no-async-scheduling --output-json "$OUT/profile_tinyllama_sync.json"
}
stage_throughput() {
    $PY -m pagellm bench throughput --model $TINY --load-format dummy --dtype bfloat16 --device cuda \
        --workload nanovllm --compare hf --hf-num-prompts 16 --skip-hf-single --bound \
        --variant num_scheduler_steps=8 --output-json "$OUT/throughput_tinyllama_nanovllm.json"
}
stage_multistep() {
    profile --output-json "$OUT/profile_tinyllama_ms1.json"
    profile --num-scheduler-steps 4 --output-json "$OUT/profile_tinyllama_ms4.json"
    profile --num-scheduler-steps 8 --output-json "$OUT/profile_tinyllama_ms8.json"
    $PY scripts/check_cuda.py $MODELS/llama $MODELS/gpt2 $MODELS/mistral pagellm/assets/shakespeare-llama \
        --num-scheduler-steps 4
}
stage_nosync() {
    $PY -m pytest -q -p no:cacheprovider tests/worker/test_cuda_graphs.py -k never_make_the_host_wait
}
stage_gemma2() {
    local m=$MODELS/gemma2
    $PY scripts/compare_layers.py $m --device cuda
    $PY scripts/check_cuda.py $m && $PY scripts/check_cuda.py $m --enforce-eager --no-async-scheduling
}
stage_gpt2() {
    $PY -m pagellm bench throughput --model $GPT2 --load-format dummy --dtype float32 --device cuda \
        --compare hf --skip-hf-single --variant num_scheduler_steps=8 --output-json "$OUT/throughput_gpt2_cuda.json"
}
stage_greedy_all() {
    $PY scripts/check_cuda.py && $PY scripts/check_cuda.py --enforce-eager --no-async-scheduling
}
stage_sweep() {  # the fastest setting goes to $OUT/attention_best.txt; later stages run with it
    attn --batch-size 256 --context-len 1024 --tile-n 32,64,128 --num-warps 2,4,8 --num-stages 2,3,4 --iters 10 \
        --output-json "$OUT/attention_sweep.json" &&
    $PY -c "import json, sys; r = max(json.load(open(sys.argv[1]))['results'], key=lambda r: r['gbs'])
print(','.join(f'{k}={r[k]}' for k in ('tile_n', 'num_warps', 'num_stages') if k in r))" \
        "$OUT/attention_sweep.json" > "$OUT/attention_best.txt" &&
    echo "fastest: $(cat "$OUT/attention_best.txt"); later stages run with PAGELLM_ATTENTION_LAUNCH set to it" &&
    attn --batch-size 8 --context-len 4096 --num-splits 4,8,16,32 --iters 10  # the split heuristic picks 8 here
}
stage_ablations() {
    PAGELLM_FUSED_ELEMENTWISE=0 profile --output-json "$OUT/profile_tinyllama_unfused.json"
    profile --enforce-eager --output-json "$OUT/profile_tinyllama_eager.json"
}
stage_cases() {
    $PY -m pytest -q -p no:cacheprovider tests/worker/test_attention_backends.py -k cuda
}
stage_spec() {
    $PY scripts/check_cuda.py $MODELS/llama $MODELS/gpt2 $MODELS/mistral pagellm/assets/shakespeare-llama --speculative 4
    $PY -m pagellm bench speculative --device cuda --rounds 3 --output-json "$OUT/speculative_b1.json"
    $PY -m pagellm bench speculative --device cuda --rounds 3 --batch-size 16 --output-json "$OUT/speculative_b16.json"
    $PY scripts/check_cuda.py $MODELS/llama $MODELS/gpt2 pagellm/assets/shakespeare-llama --draft-model self
    $PY -m pagellm bench speculative --device cuda --rounds 3 --draft-model pagellm/assets/shakespeare-llama-draft \
        --output-json "$OUT/speculative_draft_b1.json"
}
stage_lora() {
    $PY scripts/check_cuda.py $MODELS/llama $MODELS/gpt2 $MODELS/gpt_neox $MODELS/gemma3 pagellm/assets/shakespeare-llama \
        --lora && $PY scripts/check_cuda.py $MODELS/llama $MODELS/gpt2 --lora --enforce-eager --no-async-scheduling
}
stage_pooling() {
    $PY scripts/check_cuda.py $MODELS/llama $MODELS/gpt2 $MODELS/qwen3 $MODELS/gemma2 --pooling
}
stage_images() {
    $PY scripts/check_cuda.py --images && $PY scripts/check_cuda.py --images --enforce-eager
}
stage_sleep() {
    $PY -m pytest -q -p no:cacheprovider tests/engine/test_sleep_and_weights.py -k cuda -x || return 1
    # a real checkpoint of the TinyLlama-1.1B shape (random bf16 weights) to reload: sleep, reload and weight
    # updates against a cold start, on the GPU
    $PY -c "import torch, transformers as t; c = t.AutoConfig.from_pretrained('$TINY'); \
torch.manual_seed(0); t.AutoModelForCausalLM.from_config(c, dtype=torch.bfloat16).save_pretrained('$OUT/tiny-ckpt')" &&
    $PY -m pagellm bench sleep --device cuda --model "$OUT/tiny-ckpt" --dtype bfloat16 --rounds 3 \
        --output-json "$OUT/sleep.json"
}
stage_gpu_tests() {
    $PY -m pytest -q -p no:cacheprovider tests -m "not slow" -k "cuda or gpu" -x
}

declare -A LIMIT=([info]=60 [quick]=180 [attention]=90 [greedy]=150 [profile]=200 [throughput]=360 [gpt2]=200
                  [nosync]=90 [gemma2]=90 [profile_sync]=120 [multistep]=300
                  [greedy_all]=400 [sweep]=200 [ablations]=200 [cases]=300 [gpu_tests]=400 [spec]=150 [lora]=150
                  [pooling]=120 [images]=180 [sleep]=180)
STAGES=("$@")
[ ${#STAGES[@]} -eq 0 ] && STAGES=(info quick attention profile multistep profile_sync throughput gpt2 greedy_all sweep
                                   ablations cases)
for s in "${STAGES[@]}"; do
    t0=$SECONDS
    if [ -z "${PAGELLM_ATTENTION_LAUNCH:-}" ] && [ -s "$OUT/attention_best.txt" ]; then
        export PAGELLM_ATTENTION_LAUNCH=$(cat "$OUT/attention_best.txt")
    fi
    echo; echo "== $s (limit ${LIMIT[$s]} s${PAGELLM_ATTENTION_LAUNCH:+; attention launch $PAGELLM_ATTENTION_LAUNCH})" |
        tee -a "$LOG"
    export -f "stage_$s" attn profile 2>/dev/null
    export PY TINY GPT2 MODELS OUT
    timeout "${LIMIT[$s]}" bash -c "stage_$s" 2>&1 | tee -a "$LOG" | grep -v -E "^\s*$" | tail -25
    rc=${PIPESTATUS[0]}
    SUMMARY+=("$(printf '%-11s rc=%-3s %4d s' "$s" "$rc" $((SECONDS - t0)))")
done
echo; echo "== stages" | tee -a "$LOG"
printf '%s\n' "${SUMMARY[@]}" | tee -a "$LOG"
