# Sourced by run.sh and methods.sh: the closing step both share. compare_runs DOCS REFERENCE TITLE META RUN...
# evaluates the first seed's Meal run at its conditioned start and as the base policy (once: a front that
# exists is kept), then meal-compare over RUN... and those two, into DOCS, with the wall time since $start,
# SEEDS and the JSON fields META (e.g. '"online_iterations": 12') as its metadata (meal-compare adds the
# date and the machine).
compare_runs() {
  local docs=$1 reference=$2 title=$3 extra=$4 first=$OUT/meal-s${SEEDS%%,*} meta
  shift 4
  [ -f "$first/eval-conditioned/front.json" ] || "$BIN/meal-eval" "run_dir=$first" checkpoint=conditioned
  [ -f "$first/eval-base/front.json" ] || "$BIN/meal-eval" "run_dir=$first" untrained=true label=base
  meta=$(printf '{"experiment": "%s", "wall_seconds": %d, "seeds": "%s", %s}' \
    "$(basename "$docs")" "$(( $(date +%s) - start ))" "$SEEDS" "$extra")  # meal-compare adds date and machine
  mkdir -p "$docs"
  "$BIN/meal-compare" "$@" "$first/eval-conditioned" "$first/eval-base" --reference "$reference" --out "$docs" \
    --meta "$meta" --title "$title"
}
