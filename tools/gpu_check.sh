#!/usr/bin/env bash
# The one prepared device check of jqlora on an NVIDIA GPU, on the lent machine's image as it is (Python 3.12, jax
# 0.11.2 with the cuda13 plugin, no omegaconf / datasets / bitsandbytes / tensorboardX), and its CPU smoke mode, which
# runs the same stages end to end on a tiny model:
#
#   tools/gpu_check.sh            # on the GPU machine (stops itself before 8 minutes)
#   tools/gpu_check.sh --smoke    # on a CPU: tiny shapes, few steps
#
# Nothing comes from an index. jqlora's core (models, train step, bench, plan without --config) imports without the
# four missing packages; only the PyTorch reference needs one of them, bitsandbytes, which travels as a wheel
# (tools/fetch_wheels.sh writes it to tools/wheels, 41 MB; carry that folder). Without it the reference row says why.
#
# Stages, each independent (one that fails or runs out of time writes its error row and the next runs), each with a
# time budget (doubled by --smoke: GPU_CHECK_SMOKE_STAGE_SCALE) under an overall deadline (GPU_CHECK_BUDGET_S,
# default 460 s), all sharing XLA's persistent compilation cache ($JAX_COMPILATION_CACHE_DIR, default
# /tmp/jqlora-gpu-check-xla: it outlives $OUT, so a rerun on the same warm machine reads its programs back). Rows go
# to $OUT/gpu_check.jsonl (default ./gpu_check_out) as they are measured:
#   wheels      the carried wheels installed with --no-index --no-deps into a folder on PYTHONPATH (when there);
#   env         versions, the device, which optional packages are missing;
#   attention   cuDNN attention against the XLA path, output and gradients: causal / packed / sliding window, bf16
#               (smoke: the XLA path against itself in float32);
#   remat_auto  python -m jqlora.plan --compile --remat auto on this device: the ranking by estimated step time among
#               the policies whose compiled peak fits, and the choice;
#   bench       tools/bench.py --init device: remat full with the PyTorch reference (transformers + bitsandbytes + peft)
#               once beside it, then save_dots, then the auto choice when it is neither;
# and a summary table at the end.
set -uo pipefail  # (no -e: a failed stage writes its row and the next one runs)
cd "$(dirname "$0")/.."
SMOKE=0
[[ "${1:-}" == "--smoke" ]] && SMOKE=1
OUT="${OUT:-gpu_check_out}"
WHEELS="${WHEELS:-tools/wheels}"
PY="${PYTHON:-python3}"
BUDGET="${GPU_CHECK_BUDGET_S:-460}"
START=$(date +%s)
mkdir -p "$OUT"
ROWS="$OUT/gpu_check.jsonl"
: > "$ROWS"
export XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export JAX_COMPILATION_CACHE_DIR="${JAX_COMPILATION_CACHE_DIR:-/tmp/jqlora-gpu-check-xla}"
export JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=0 JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES=-1
mkdir -p "$JAX_COMPILATION_CACHE_DIR"

STAGE_SCALE=1  # the stage budgets below are the GPU machine's (16 cores); a loaded 2-core CPU compiles slower
if [[ $SMOKE == 1 ]]; then
    STAGE_SCALE="${GPU_CHECK_SMOKE_STAGE_SCALE:-2}"  # (the overall deadline, $BUDGET, still holds)
    MODEL=tiny; SEQ=64; STEPS="--steps 2 --warmup 1"; MEM=8
    # bench's tiny shape, for the plan (which knows published shapes by name)
    PLAN_MODEL=(--model-config "$($PY -c 'import importlib.util as u, json, sys
s = u.spec_from_file_location("b", "tools/bench.py"); m = u.module_from_spec(s); s.loader.exec_module(m)
print(json.dumps({**m.hf_config("tiny"), "model_type": "llama"}))')")
else
    MODEL=llama3-8b; SEQ=2048; STEPS="--steps 5 --warmup 2"; MEM=""
    PLAN_MODEL=(--model "$MODEL")
fi

row() { echo "$1" >> "$ROWS"; echo "gpu_check: $1"; }
left() { echo $(( BUDGET - ($(date +%s) - START) )); }

# stage NAME SECONDS COMMAND...: run COMMAND under `timeout` (its budget, or what is left of the deadline if less),
# its output in $OUT/NAME.log; the stage row says ok / error / timeout / skipped, its seconds and the log's last line
stage() {
    local name=$1 want=$(( $2 * STAGE_SCALE )); shift 2
    local have; have=$(left)
    local limit=$(( want < have ? want : have ))
    if (( limit < 5 )); then
        row "{\"stage\": \"$name\", \"status\": \"skipped\", \"reason\": \"out of time ($have s left of $BUDGET)\"}"
        return 1
    fi
    local t0; t0=$(date +%s)
    timeout --kill-after=10 "$limit" "$@" > "$OUT/$name.log" 2>&1
    local rc=$? status=ok
    (( rc == 124 || rc == 137 )) && status=timeout
    (( rc != 0 && rc != 124 && rc != 137 )) && status=error
    local last=""
    [[ $status != ok ]] && last=$(grep -v '^\s*$' "$OUT/$name.log" | tail -n 1 | cut -c1-300)
    row "$($PY -c 'import json, sys; n, s, rc, sec, lim, last = sys.argv[1:]
print(json.dumps({"stage": n, "status": s, "rc": int(rc), "seconds": int(sec), "limit_s": int(lim),
                  **({"error": last} if last else {})}))' "$name" "$status" "$rc" "$(( $(date +%s) - t0 ))" "$limit" "$last")"
    [[ $status == ok ]]
}

# wheels the image lacks (bitsandbytes for the reference), installed offline into a folder of their own
if compgen -G "$WHEELS/*.whl" >/dev/null; then
    SITE="${TMPDIR:-/tmp}/jqlora-gpu-check-site"
    stage wheels 60 $PY -m pip install --quiet --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target "$SITE" "$WHEELS"/*.whl && export PYTHONPATH="$PYTHONPATH:$SITE"
fi

stage env 60 $PY - "$ROWS" <<'EOF'
import importlib.util, json, platform, sys
import jax, jaxlib
missing = [m for m in ("omegaconf", "datasets", "bitsandbytes", "tensorboardX", "torch", "peft", "transformers")
           if importlib.util.find_spec(m) is None]
d = jax.devices()[0]
row = {"stage": "env_info", "python": platform.python_version(), "jax": jax.__version__, "jaxlib": jaxlib.__version__,
       "device": f"{d.platform}:{getattr(d, 'device_kind', '?')}", "memory_bytes": (d.memory_stats() or {}).get(
           "bytes_limit"), "missing": missing}
open(sys.argv[1], "a").write(json.dumps(row) + "\n")
print(json.dumps(row))
EOF
if [[ -z "$MEM" ]]; then
    MEM=$($PY -c "import json, sys; r = [json.loads(l) for l in open(sys.argv[1]) if 'env_info' in l]
print(r[0]['memory_bytes'] / 1e9 if r and r[0]['memory_bytes'] else 80)" "$ROWS" 2>/dev/null || echo 80)
fi

stage attention 90 $PY - "$SMOKE" "$ROWS" <<'EOF'
import json, sys
import jax, jax.numpy as jnp
from jqlora.models.attention import attention
smoke = sys.argv[1] == "1"
impl, dtype = ("xla", jnp.float32) if smoke else ("cudnn", jnp.bfloat16)
B, S, N, K, H = (1, 128, 4, 2, 32) if smoke else (2, 512, 8, 2, 128)
ks = jax.random.split(jax.random.PRNGKey(0), 3)
q = jax.random.normal(ks[0], (B, S, N, H), dtype)
k = jax.random.normal(ks[1], (B, S, K, H), dtype)
v = jax.random.normal(ks[2], (B, S, K, H), dtype)
a, b = S * 2 // 5, S // 2
seg = jnp.concatenate([jnp.full((B, a), 1), jnp.full((B, b), 2), jnp.zeros((B, S - a - b), int)], 1).astype(jnp.int32)
for case, kw in {"causal": {}, "packed": dict(q_segment_ids=seg, kv_segment_ids=seg),
                 "window": dict(q_segment_ids=seg, kv_segment_ids=seg, window=S // 4)}.items():
    def loss(q, k, v, impl):
        out = attention(q, k, v, scale=H ** -0.5, implementation=impl, **kw).astype(jnp.float32)
        return jnp.sum(out * jnp.cos(jnp.arange(H)))
    got = jax.jit(jax.value_and_grad(loss, (0, 1, 2)), static_argnums=3)(q, k, v, impl)
    want = jax.jit(jax.value_and_grad(loss, (0, 1, 2)), static_argnums=3)(q, k, v, "xla")
    err = max(float(jnp.max(jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32))))
              for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)))
    hlo = jax.jit(lambda q, k, v: loss(q, k, v, impl)).lower(q, k, v).compile().as_text()
    row = {"stage": "attention_case", "case": case, "impl": impl, "max_abs_err_vs_xla": err,
           "cudnn_custom_call": "__cudnn$fmha" in hlo}
    open(sys.argv[2], "a").write(json.dumps(row) + "\n")
    print(json.dumps(row), flush=True)
EOF

# remat auto on this device: the compiled peaks, the estimated step times, the ranking and the choice
AUTO=""
if stage remat_auto 150 $PY -m jqlora.plan "${PLAN_MODEL[@]}" --seq "$SEQ" --batch 1 --remat auto --memory "$MEM" \
        --compile; then :; fi
AUTO=$(sed -n 's/^remat auto (compiled) -> \([a-z_]*\).*/\1/p' "$OUT/remat_auto.log" | head -n 1)
row "$($PY -c 'import json, sys; mem, auto, log = sys.argv[1:]
rank = [l.strip() for l in open(log) if l.lstrip().startswith("rank ")]
print(json.dumps({"stage": "remat_auto_choice", "memory_gb": float(mem), "choice": auto or None, "ranking": rank}))' \
    "$MEM" "$AUTO" "$OUT/remat_auto.log" 2>/dev/null || echo '{"stage": "remat_auto_choice", "choice": null}')"

bench() {  # remat, reference, budget
    local name="bench_$1"
    stage "$name" "$3" $PY tools/bench.py --model "$MODEL" --seq "$SEQ" --remat "$1" $STEPS --init device \
        --reference "$2" --timeout "$(( $3 * STAGE_SCALE ))" --out "$OUT/$name.json"
    row "$($PY -c 'import json, sys
doc = json.load(open(sys.argv[1])); r = doc["results"][0]; jq, ref = r["jqlora"], r["reference"]
keep = ("step_ms_median", "tokens_per_s", "peak_bytes", "mfu", "error", "skipped")
print(json.dumps({"stage": "bench_result", "remat": sys.argv[2], "jqlora": {k: jq[k] for k in keep if k in jq},
                  "reference": {k: ref[k] for k in keep if k in ref}, "ref_ms_over_jq_ms": r["ref_ms_over_jq_ms"]}))' \
        "$OUT/$name.json" "$1" 2>/dev/null || echo "{\"stage\": \"bench_result\", \"remat\": \"$1\", \"result\": null}")"
}
bench full torch 150
bench save_dots none 90
[[ -n "$AUTO" && "$AUTO" != full && "$AUTO" != save_dots ]] && bench "$AUTO" none 90

$PY - "$ROWS" "$BUDGET" "$(( $(date +%s) - START ))" <<'EOF'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
print(f"\n## gpu_check summary ({sys.argv[3]} s of a {sys.argv[2]} s budget)\n")
print("| stage | status | s | figures |\n|---|---|---|---|")
for r in rows:
    if "status" not in r:
        continue
    print(f"| {r['stage']} | {r['status']} | {r.get('seconds', '')} | {r.get('error', r.get('reason', ''))[:120]} |")
for r in rows:
    if r["stage"] == "env_info":
        print(f"\nenv: python {r['python']}, jax {r['jax']}, {r['device']}, missing: {', '.join(r['missing']) or '-'}")
    elif r["stage"] == "attention_case":
        print(f"attention {r['case']}: {r['impl']} max |err| vs xla {r['max_abs_err_vs_xla']:.3g}, cuDNN call "
              f"{r['cudnn_custom_call']}")
    elif r["stage"] == "remat_auto_choice":
        print(f"remat auto at {r.get('memory_gb')} GB: {r.get('choice')}")
        for line in r.get("ranking", []):
            print(f"  {line}")
print("\n| remat | jqlora step ms | tokens/s | peak GB | reference step ms | ref peak GB | ref/jq |\n|---|---|---|---|---|---|---|")
for r in rows:
    if r["stage"] == "bench_result" and r.get("jqlora") is not None:
        jq, ref = r["jqlora"], r["reference"]
        f = lambda d, k, s=1.0, p=".1f": format(d[k] / s, p) if d.get(k) is not None else (d.get("error") or d.get("skipped") or "-")[:40]
        print(f"| {r['remat']} | {f(jq, 'step_ms_median')} | {f(jq, 'tokens_per_s', p='.0f')} | {f(jq, 'peak_bytes', 1e9, '.2f')} "
              f"| {f(ref, 'step_ms_median')} | {f(ref, 'peak_bytes', 1e9, '.2f')} | {r['ref_ms_over_jq_ms'] or '-'} |")
print(f"\nrows in {sys.argv[1]}")
EOF
