# shellcheck shell=bash
# Shared by the GPU job scripts (e2e.sh, vllm_e2e.sh); source it from the repository root.

# run_prologue ARCHIVE OUT_DEFAULT RES_DEFAULT TOTAL_S_DEFAULT: the job's clock and deadline (START, TOTAL_S),
# its output folder (OUT, where run.log is written and ARCHIVE packed) and results folder (RES), the console
# copied to $OUT/run.log, and $RES packed into $OUT/ARCHIVE on exit (call `pack` after every step as well:
# the test machine sends back only a few files, and a cut run still returns what was packed).
run_prologue() {
  ARCHIVE=$1
  START=$(date +%s)
  TOTAL_S=${TOTAL_S:-$4}
  OUT=${OUT:-$2}
  mkdir -p "$OUT"
  OUT=$(cd "$OUT" && pwd)
  RES=${RES:-$3}
  mkdir -p "$RES"
  exec > >(tee -a "$OUT/run.log") 2>&1
  trap pack EXIT
  export PYTHONUNBUFFERED=1
}

pack() { tar -czf "$OUT/$ARCHIVE" -C "$RES" . 2>/dev/null; }

left() { echo $((START + TOTAL_S - $(date +%s))); }
