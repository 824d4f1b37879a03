#!/usr/bin/env bash
# One GPU session's heal measurements for SmolLM2, in the order the issue asks: the ablation
# at an equal token count (bench/heal_ablate.py), then the winner alone at the bundled budget
# (bench/heal_gpu.py --pick-from: the rule fixed in its docstring, so nobody picks by eye).
# A command on the GPU machine may run 10 minutes, so start this detached and poll:
#
#   setsid nohup bash bench/heal_session.sh > /dev/null 2>&1 &
#   tail /tmp/bq-session/*.log; ls /tmp/bq-session/done
#
# TOKENS (training tokens a variant), VARIANTS (replaces the default list), DEADLINE (seconds for the whole ablation), JOBS
# (variants at once) and REAL_TEXT (a text, JSON Lines or Parquet file of your own: adds a
# variant with half real text) may be set in the environment. Five at once ran the on-policy
# variant out of an H100's memory until heal gave its sampler's memory back; since then five
# fit (at most 75.5 of 80 GB, docs/heal.md). Files land in /tmp/bq-session.
set -u
cd "$(dirname "$0")/.."
W=/tmp/bq-session
mkdir -p "$W"
export PYTHONUNBUFFERED=1
# VARIANTS (space-separated NAME:field=value,... specs) replaces the default list.
if [ -n "${VARIANTS:-}" ]; then
  read -r -a specs <<< "$VARIANTS"
else
  specs=(base: rkl:loss=reverse_kl opw25:on_policy=0.25,on_policy_start=0.5 topp:sample_top_p=0.9
         ${REAL_TEXT:+"real50:data=$REAL_TEXT,data_share=0.5"})
fi
python3 bench/heal_ablate.py --tokens "${TOKENS:-6291456}" --set sample_tokens=2097152 --set micro_batch_tokens=16384 \
  --jobs "${JOBS:-4}" --deadline "${DEADLINE:-560}" --work "$W/ablate" --json "$W/ablate.json" \
  $(printf -- '--variant %s ' "${specs[@]}") > "$W/ablate.log" 2>&1
touch "$W/ablate-done"
# HEADLINE=if-new (default) runs the winner alone only when it is not the bundled recipe
# (whose headline is already measured); always / never as they say. When the bundled recipe
# wins and HEADLINE_DATA names a file, the headline is the bundled recipe on half that text.
new_winner() { python3 -c "
import sys; sys.path.insert(0, 'bench'); from heal_gpu import pick; sys.exit(0 if pick('$W/ablate.json') else 1)"; }
headline() {
  python3 bench/heal_gpu.py smollm2 "$@" --also-eval bitquant/data/paradise-lost.txt \
    --out "$W/healed" --copy "$W/headline" > "$W/headline.log" 2>&1
}
case "${HEADLINE:-if-new}" in
  always) headline --pick-from "$W/ablate.json" ;;
  if-new) if new_winner; then headline --pick-from "$W/ablate.json"
          elif [ -n "${HEADLINE_DATA:-}" ]; then headline --data "$HEADLINE_DATA" --set data_share=0.5; fi ;;
esac
touch "$W/done"
