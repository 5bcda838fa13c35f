#!/usr/bin/env bash
# The one prepared device check of jqlora on an NVIDIA GPU (planned to fit 8 minutes on one H200), and its CPU
# smoke mode, which runs the same stages end to end on a tiny model:
#
#   tools/gpu_check.sh            # on the GPU machine
#   tools/gpu_check.sh --smoke    # on a CPU: tiny model, few steps
#
# Stages, each writing its row to $OUT/gpu_check.jsonl (default ./gpu_check_out) as soon as it is measured:
#   0. wheels the GPU image lacks (omegaconf + antlr4, datasets, bitsandbytes): installed from $WHEELS
#      (default tools/wheels; fill it beforehand with
#      `pip download --only-binary=:all: --python-version 3.12 -d tools/wheels omegaconf bitsandbytes`), if present;
#   1. cuDNN attention at run time: jqlora.models.attention with implementation="cudnn" against the XLA path,
#      output and gradients, causal / packed / sliding window, bf16 (smoke: the XLA path against itself in float32);
#   2. remat auto from the compiled figure on this device (python -m jqlora.plan --compile --remat auto);
#   3. jqlora tokens/s and peak memory, Llama-3-8B shapes with random weights drawn on the device, remat full and
#      the auto choice (tools/bench.py --init device), with
#   4. the PyTorch reference (transformers + bitsandbytes + peft) once, beside remat full.
set -euo pipefail
cd "$(dirname "$0")/.."
SMOKE=0
[[ "${1:-}" == "--smoke" ]] && SMOKE=1
OUT="${OUT:-gpu_check_out}"
WHEELS="${WHEELS:-tools/wheels}"
PY="${PYTHON:-python3}"
mkdir -p "$OUT"
ROWS="$OUT/gpu_check.jsonl"
export XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
row() { echo "$1" >> "$ROWS"; echo "gpu_check: $1"; }

if [[ $SMOKE == 1 ]]; then
    MODEL=tiny; SEQ=128; STEPS="--steps 2 --warmup 1"; MEM=8
else
    MODEL=llama3-8b; SEQ=2048; STEPS="--steps 5 --warmup 2"
    MEM=$($PY -c "import jax; print(jax.devices()[0].memory_stats()['bytes_limit'] / 1e9)")
fi

# 0. wheels
if compgen -G "$WHEELS/*.whl" >/dev/null; then
    $PY -m pip install --quiet --no-index --find-links "$WHEELS" "$WHEELS"/*.whl
    row "{\"stage\": \"wheels\", \"installed\": $(ls "$WHEELS"/*.whl | wc -l)}"
fi

# 1. cuDNN attention accepted at run time, and equal to the XLA path
$PY - "$SMOKE" >> "$ROWS" <<'EOF'
import json, sys
import jax, jax.numpy as jnp
from jqlora.models.attention import attention
smoke = sys.argv[1] == "1"
impl, dtype = ("xla", jnp.float32) if smoke else ("cudnn", jnp.bfloat16)
B, S, N, K, H = 2, 512, 8, 2, 128
ks = jax.random.split(jax.random.PRNGKey(0), 3)
q = jax.random.normal(ks[0], (B, S, N, H), dtype)
k = jax.random.normal(ks[1], (B, S, K, H), dtype)
v = jax.random.normal(ks[2], (B, S, K, H), dtype)
seg = jnp.concatenate([jnp.full((B, 200), 1), jnp.full((B, 250), 2), jnp.zeros((B, 62), int)], 1).astype(jnp.int32)
for case, kw in {"causal": {}, "packed": dict(q_segment_ids=seg, kv_segment_ids=seg),
                 "window": dict(q_segment_ids=seg, kv_segment_ids=seg, window=128)}.items():
    def loss(q, k, v, impl):
        out = attention(q, k, v, scale=H ** -0.5, implementation=impl, **kw).astype(jnp.float32)
        return jnp.sum(out * jnp.cos(jnp.arange(H)))
    got = jax.jit(jax.value_and_grad(loss, (0, 1, 2)), static_argnums=3)(q, k, v, impl)
    want = jax.jit(jax.value_and_grad(loss, (0, 1, 2)), static_argnums=3)(q, k, v, "xla")
    err = max(float(jnp.max(jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32))))
              for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)))
    hlo = jax.jit(lambda q, k, v: loss(q, k, v, impl)).lower(q, k, v).compile().as_text()
    print(json.dumps({"stage": "attention", "case": case, "impl": impl, "max_abs_err_vs_xla": err,
                      "cudnn_custom_call": "__cudnn$fmha" in hlo}), flush=True)
EOF
tail -n 3 "$ROWS"

# 2. remat auto from the compiled figure on this device
if [[ $SMOKE == 1 ]]; then
    AUTO=full  # a CPU reports no memory: auto is full there (jqlora.planning.resolve_remat)
else
    AUTO=$($PY -m jqlora.plan --model "$MODEL" --seq "$SEQ" --batch 1 --remat auto --memory "$MEM" --compile \
           | sed -n 's/^remat auto (compiled) -> \([a-z_]*\):.*/\1/p')
fi
row "{\"stage\": \"remat_auto\", \"memory_gb\": $MEM, \"choice\": \"$AUTO\"}"

# 3. jqlora remat full with 4. the reference beside it (once); then jqlora at the auto choice
bench() {  # remat, reference, name
    $PY tools/bench.py --model "$MODEL" --seq "$SEQ" --remat "$1" $STEPS --init device --reference "$2" \
        --out "$OUT/$3.json" > "$OUT/$3.log" 2>&1 || true
    local result
    result=$($PY -c 'import json, sys; print(json.dumps(json.load(open(sys.argv[1]))))' "$OUT/$3.json" 2>/dev/null \
             || echo null)
    row "{\"stage\": \"bench\", \"remat\": \"$1\", \"reference\": \"$2\", \"result\": $result}"
}
bench full torch full_with_reference
[[ "$AUTO" != full && -n "$AUTO" ]] && bench "$AUTO" none "auto_$AUTO"
echo "gpu_check: rows in $ROWS"
