#!/usr/bin/env bash
# One GPU lease in one call: the P4 measurements issue 14 still waits for, most important first.
#
# A lease is short (minutes of device time, a machine start included), so each step runs under its own time limit,
# cut to what is left of BUDGET seconds, and a step that does not fit is skipped and said so; bench/gpu.py stores
# each row as soon as it ends, and after every step the results are copied to $OUT, so a step cut off at its limit
# loses only its unfinished row; the exit status is 1 when a step failed or was skipped for lack of time. Steps
# (default: decode train smoke small layers graph eager, in this order; name others or a subset as arguments):
#   decode  greedy decoding with CUDA graphs in lowbit's own loop (what generate --static-cache runs): bf16, lowbit
#           W4 without a LoRA fused (q/k/v and gate/up as two products, the default from 6ed33d2 on), bf16 with no
#           block linear (the floor), W4 unfused, W4 with its LoRA (a fine-tuned model: the kernel's kept LoRA
#           copies, from 608b81b on); then bf16 and W4 in transformers' loop; each kernel's device time per token
#   train   fine-tuning: PEFT + bitsandbytes and lowbit W4/W3/W2 resident together, trained in rotated rounds (no
#           run order to favour any: W3/W2's 0.98x/0.93x came from rows run one after another); the same for
#           PEFT + bitsandbytes against lowbit W4/W2 compiled (finetune --compile), each method's peak memory as if
#           alone; then PEFT + bitsandbytes alone with its device time per step against its wall time
#   layers  forward + backward at M = 2048 of the three Llama-2-7B layer shapes, eager and in device time
#           (the training-size goal, without the Python noise of eager timings)
#   smoke   every command with --device cuda (decoding on tinygemm, siblings fused, lowbit's loop; finetune
#           --compile), the CUDA kill -9 resume
#   small   graph rows at TinyLlama's layer shapes and at the two fused products': dense and tinygemm first, then
#           bitsandbytes, triton-decode, triton-gemv, GemLite (is a W4 kernel's time there bytes or a per-call cost,
#           and what does fusing save)
#   graph   tinygemm W4/W3/W2, dense and bitsandbytes on both 7B layer shapes from replayed CUDA graphs, each size
#           timed five times (is W2's 0.9% over W4 on the same kernel more than the runs' spread?); then W4 with a
#           r16 LoRA from the kernel's kept copies (16.7 us over the layer on triton-decode at cd0db78)
#   eager   greedy decoding without CUDA graphs, as lowbit generate decodes by default: bf16, bitsandbytes NF4 and
#           lowbit W4 with its LoRA, now in a steady block (kernel state checked once a block, not every token; W4
#           decoded at 17.3 tokens/s against bf16's 41.7 on an H200 at 6cbcb70, before steady blocks)
#   calib   the 7B-shaped apiq-bw calibration row, two blocks -- only on an H100, where the goal is set (issue 13)
#
#   device tool: LOWBIT_COMMIT=<this checkout's short commit> bash bench/gpu_session.sh   (carry [".whl"]; the tree
#                travels without .git, so the commit is named here; kind nvidia-h100-x1 for the calib step)
#   here:        DRY=1 OUT=/tmp/session bash bench/gpu_session.sh    (the CPU, tiny shapes: checks the plumbing)
set -u
: "${OUT:?set OUT to the folder the results are copied to}"
BUDGET=${BUDGET:-540}
DRY=${DRY:-}
steps=("$@")
[ ${#steps[@]} -eq 0 ] && steps=(decode train smoke small layers graph eager)
start=$SECONDS
mkdir -p "$OUT"
log=$OUT/session.log
failed=0
py=${PYTHON:-python3}

if [ -z "$DRY" ] && ls .whl/*.whl >/dev/null 2>&1; then  # bitsandbytes, gemlite, gguf: not in the GPU image
    $py -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || exit 1
    export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=src:bench:${PYTHONPATH:-} PYTHONUNBUFFERED=1
dry=${DRY:+--dry-run}
if ! device=$($py -c 'import torch; print(torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu")'); then
    echo "[session] $py cannot import torch: set PYTHON to an interpreter that has it" | tee -a "$log"
    exit 1
fi
echo "[session] $device, commit ${LOWBIT_COMMIT:-unknown}, budget ${BUDGET}s, steps: ${steps[*]}" | tee -a "$log"

step() {  # NAME LIMIT COMMAND...: run COMMAND for at most LIMIT seconds (less if the budget has less left)
    local name=$1 limit=$2 left began=$SECONDS
    shift 2
    left=$((BUDGET - (SECONDS - start)))
    if [ "$left" -lt 30 ]; then
        echo "[session] $name: skipped, ${left}s of the budget left" | tee -a "$log"
        failed=1
        return
    fi
    [ "$limit" -gt "$left" ] && limit=$left
    echo "[session] $name: $* (limit ${limit}s)" | tee -a "$log"
    timeout -k 10 "$limit" "$@" >>"$log" 2>&1
    local code=$?
    echo "[session] $name: exit $code after $((SECONDS - began))s" | tee -a "$log"
    [ "$code" -ne 0 ] && failed=1
    # gpu.py stores each row as it ends (a dry run stores nothing); the smoke writes its own file to $OUT
    [ -z "$DRY" ] && cp bench/results/gpu.json "$OUT"/ 2>/dev/null
    return 0
}

for s in "${steps[@]}"; do
    case $s in
    smoke)  # its JSON is written at its end only: a smoke cut off leaves none in $OUT, not a stale one
        if [ -n "$DRY" ]; then step smoke 480 $py bench/gpu_smoke.py --device cpu --out "$OUT"/gpu_smoke.json
        else step smoke 280 $py bench/gpu_smoke.py --device cuda --out "$OUT"/gpu_smoke.json; fi ;;
    graph)
        rows=$(for shape in 4096x11008 11008x4096; do
            for m in lowbit-w4-int4 lowbit-w3-int4 lowbit-w2-int4 dense-bf16 bnb-nf4; do
                printf 'graph-%s-%s,' $shape $m
            done
        done)graph-4096x11008-lowbit-w4
        step graph 120 $py bench/gpu.py $dry --repeats 5 --rows "$rows" ;;
    calib)
        if [[ $device == *H100* || -n $DRY ]]; then step calib 240 $py bench/gpu.py $dry --rows calib-apiq --blocks 2
        else echo "[session] calib: skipped on $device (the goal is an H100's)" | tee -a "$log"; fi ;;
    decode) step decode 320 $py bench/gpu.py $dry --profile --rows "decode-bf16-loop,decode-lowbit-w4-base-loop,\
decode-bf16-nolinear-loop,decode-lowbit-w4-unfused-loop,decode-lowbit-w4-loop,decode-bf16-graphs,\
decode-lowbit-w4-base-graphs" ;;
    train) step train 300 $py bench/gpu.py $dry --profile --rows train-interleaved,train-interleaved-compiled,\
train-bnb-qlora ;;
    small)  # exact names: the prefix graph-2048x256 would also take graph-2048x2560's rows
        shapes="2048x256 2048x2048 2048x5632 5632x2048 2048x2560 2048x11264"
        rows=$(for m in dense-bf16 lowbit-w4-int4 bnb-nf4 lowbit-w4-decode lowbit-w4-gemv lowbit-w2-gemv gemlite-w4 \
            gemlite-w2; do for shape in $shapes; do printf 'graph-%s-%s,' "$shape" $m; done; done)
        step small 200 $py bench/gpu.py $dry --rows "${rows%,}" ;;
    layers)  # each shape's peers side by side: dense, PEFT + bitsandbytes, lowbit W4/W3/W2 (all with a LoRA but dense)
        rows=$(for shape in 4096x11008 11008x4096 4096x4096; do
            for m in dense-bf16 bnb-nf4-lora lowbit-w4 lowbit-w3 lowbit-w2; do printf 'layer-%s-%s,' $shape $m; done
        done)
        step layers 200 $py bench/gpu.py $dry --profile --rows "${rows%,}" ;;
    eager) step eager 120 $py bench/gpu.py $dry --rows decode-bf16,decode-bnb-nf4,decode-lowbit-w4 ;;
    *) echo "[session] unknown step $s (train, layers, decode, small, smoke, graph, eager, calib)" | tee -a "$log"; exit 2 ;;
    esac
done
echo "[session] done after $((SECONDS - start))s$([ $failed -ne 0 ] && echo ', some steps failed or were skipped')" \
    | tee -a "$log"
exit $failed
