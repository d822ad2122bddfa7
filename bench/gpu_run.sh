#!/usr/bin/env bash
# One command for a machine with an NVIDIA GPU, run from the repository root:
#   bash bench/gpu_run.sh build test bench # ~6 min: pip install, info, tests/test_cuda.py, benchmark
#   bash bench/gpu_run.sh sanitize         # ~3 min: compute-sanitizer sweep
#   bash bench/gpu_run.sh profile          # ~2 min: ncu on each kernel once, SASS opcode counts
#   bash bench/gpu_run.sh                  # build test sanitize bench (more than one 10-minute call)
#   bash bench/gpu_run.sh test_all         # the whole test suite on the GPU machine
# Logs go to a work folder; at the end $OUT (the device tool's output folder, which brings
# back at most 8 files) or, without it, bench/results/gpu_run/ receives summary.txt (what
# passed, with each log's tail), logs.tar.gz, the JUnit XML and the benchmark JSON +
# markdown. Stages other than build install first if soniq is not importable. The build
# targets sm_90 only unless SONIQ_CUDA_ARCHITECTURES says otherwise (half the compile
# time of "80;90" on the device's clock). Non-zero exit if any stage failed.
set -u
FINAL=${OUT:-bench/results/gpu_run}
OUT=${SONIQ_GPU_WORK:-/tmp/soniq-gpu-run}
rm -rf "$OUT" && mkdir -p "$OUT" "$FINAL"
export SONIQ_CUDA_ARCHITECTURES=${SONIQ_CUDA_ARCHITECTURES:-90}
collect() {  # at most 8 files back: the summary, the results, every log in one archive
  cp "$OUT/summary.txt" "$FINAL/" 2> /dev/null
  cp "$OUT"/*.xml "$OUT"/*.json "$OUT"/*.md "$FINAL/" 2> /dev/null
  (cd "$OUT" && tar czf "$FINAL/logs.tar.gz" --exclude='*.tar.gz' . 2> /dev/null)
}
trap collect EXIT
trap 'collect; exit 143' TERM INT  # a device call past its time limit: keep what ran
STAGES=${*:-build test sanitize bench}
PY=${PYTHON:-python3}
status=0
say() { echo "== $*" | tee -a "$OUT/summary.txt"; }
stage() {  # stage NAME LIMIT_S CMD...
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  [ $rc -ne 0 ] && status=1
  say "$name: rc=$rc ($((SECONDS - t0)) s)$([ $rc -eq 124 ] && echo ' TIMED OUT')"
  tail -n 15 "$OUT/$name.log" | sed 's/^/    /' >> "$OUT/summary.txt"
  collect  # after every stage, so even a SIGKILL of the whole run leaves the stages done so far
  return $rc
}

say "soniq GPU run $(date -u +%FT%TZ), stages: $STAGES"
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1 || true
# the build targets $SONIQ_CUDA_ARCHITECTURES: a GPU of another compute capability says "no kernel image"
say "gpu: $(nvidia-smi --query-gpu=name,compute_cap --format=csv,noheader 2>&1 | head -1); building for sm_$SONIQ_CUDA_ARCHITECTURES"
# CMake finds nvcc on PATH or through CUDACXX; fall back to the usual install place
if ! command -v nvcc > /dev/null && [ -z "${CUDACXX:-}" ]; then
  for c in /usr/local/cuda/bin/nvcc /usr/local/cuda-*/bin/nvcc; do [ -x "$c" ] && export CUDACXX=$c && break; done
fi
export PYTHONUNBUFFERED=1
# a site-packages that cannot be written to: install under /tmp/soniq-site instead
SITE=/tmp/soniq-site
[ -d "$SITE" ] && export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
BUILD=(env SONIQ_CUDA=ON "$PY" -m pip install --no-build-isolation --no-deps -v .)
BUILD_TMP=(env SONIQ_CUDA=ON "$PY" -m pip install --no-build-isolation --no-deps -v --target "$SITE" .)
build() {
  stage build 300 "${BUILD[@]}" && return 0
  stage build_target 300 "${BUILD_TMP[@]}" && export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
}
CHECK_CUDA=("$PY" -c "import soniq._C as C, sys; print('built_with_cuda', C.built_with_cuda, 'archs', C.cuda_archs(), 'devices', C.cuda_device_count(), C.cuda_error()); sys.exit(0 if C.built_with_cuda and C.cuda_device_count() else 1)")
for s in $STAGES; do
  if [ "$s" != build ] && ! (cd /tmp && $PY -c "import soniq._C" 2> /dev/null); then
    build
  fi
  case $s in
    build)
      # --no-deps: the machine has torch/numpy and no network; build dir is reused
      build
      stage check_cuda_build 60 "${CHECK_CUDA[@]}" ;;
    test)
      stage check_cuda_build 60 "${CHECK_CUDA[@]}"  # all CUDA tests would skip otherwise
      stage info 60 $PY -c "import soniq, json; print(json.dumps(soniq.info(verbose=False), indent=1, default=str))"
      # the CUDA kernels, plus the other test files with CUDA cases (quantizer, determinism)
      stage test_cuda 270 $PY -m pytest -q -ra --maxfail=40 -p no:cacheprovider tests/test_cuda.py \
        tests/test_quantize.py tests/test_determinism.py --junitxml="$OUT/test_cuda.xml" ;;
    test_all)
      stage test_all 500 $PY -m pytest -q -ra -p no:cacheprovider tests/ --junitxml="$OUT/test_all.xml" ;;
    sanitize)
      CS=$(command -v compute-sanitizer || ls /usr/local/cuda/bin/compute-sanitizer /usr/local/cuda-*/bin/compute-sanitizer 2> /dev/null | head -1)
      if [ -n "$CS" ]; then
        # only soniq's kernels are instrumented (torch's own run untouched) when supported
        FILT=(); "$CS" --help 2>&1 | grep -q -- "--kernel-name" && FILT=(--kernel-name kns=soniq)
        for tool in memcheck racecheck synccheck; do
          stage "sanitize_$tool" 110 "$CS" --tool $tool "${FILT[@]}" --error-exitcode 1 \
            $PY bench/cuda_sanitize_sweep.py
        done
      else
        say "sanitize: compute-sanitizer not found, skipped"
      fi ;;
    bench)
      stage bench 240 $PY bench/gpu_gemm.py --out "$OUT" ;;
    profile)
      # Nsight Compute on one launch of each kernel (bench/gpu_profile.py), the SASS opcodes
      # of every soniq kernel (tensor-core, popc, cp.async, spills): what explains a miss
      NCU=$(command -v ncu || ls /usr/local/cuda/bin/ncu /opt/nvidia/nsight-compute/*/ncu 2> /dev/null | head -1)
      if [ -n "$NCU" ]; then
        stage profile 150 "$NCU" --clock-control none --profile-from-start off --kernel-name-base demangled \
          --kernel-name regex:soniq --section SpeedOfLight --section Occupancy --csv --page details \
          $PY bench/gpu_profile.py
      else
        say "profile: ncu not found, skipped"
      fi
      CUOBJ=$(command -v cuobjdump || ls /usr/local/cuda/bin/cuobjdump 2> /dev/null | head -1)
      SO=$(cd /tmp && $PY -c "import soniq._C as C; print(C.__file__)" 2> /dev/null)
      if [ -n "$CUOBJ" ] && [ -n "$SO" ]; then
        stage sass 60 bash -c "set -o pipefail; '$CUOBJ' --dump-sass '$SO' | $PY bench/sass_summary.py"
      else
        say "sass: cuobjdump or the built extension not found, skipped"
      fi ;;
    *) say "unknown stage $s"; status=1 ;;
  esac
done
say "done, status $status"
exit $status
