#!/usr/bin/env bash
# Retake the README's TensorBoard screenshots: two 4-epoch runs that differ in one setting (model.hidden_size 64
# and 128; validated 4 times per epoch, so the curves have points enough to draw), TensorBoard on them, headless
# Chromium at 1,400 x 1,000.
#   bash docs/tensorboard_screenshots.sh        (needs .venv, or VENV=<a venv with charlm>, and chromium: Debian
#                                                `apt-get install chromium`)
# Writes docs/tensorboard_timeseries.png (the page TensorBoard opens on) and docs/tensorboard_hparams.png.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
venv="${VENV:-$root/.venv}"
work="$(mktemp -d)"
port="${PORT:-6199}"
tb_pid=""
trap '[[ -n "$tb_pid" ]] && kill "$tb_pid" 2>/dev/null; rm -rf "$work"' EXIT
# From an empty directory, so the runs are named as a user's would be: outputs/timemachine/<overrides>/<stamp>
for hidden in 64 128; do
  (cd "$work" && "$venv/bin/python" "$root/train.py" model.hidden_size=$hidden trainer.max_epochs=4 \
    trainer.val_check_interval=0.25 trainer.enable_progress_bar=false)
done
"$venv/bin/tensorboard" --logdir "$work/outputs" --port "$port" > "$work/tensorboard.log" 2>&1 &
tb_pid=$!
for _ in $(seq 60); do curl -sf "http://localhost:$port/" > /dev/null && break; sleep 1; done
# forceSVG: the WebGL charts of headless Chromium leave some cards blank.
shoot() {  # url fragment, window size, output file
  chromium --headless --no-sandbox --disable-gpu --hide-scrollbars --window-size="$2" \
    --run-all-compositor-stages-before-draw --virtual-time-budget=30000 --screenshot="$root/docs/$3" "http://localhost:$port/?forceSVG=true#$1" > /dev/null 2>&1
}
shoot timeseries 1400,1000 tensorboard_timeseries.png
shoot hparams 1400,1000 tensorboard_hparams.png
echo "wrote docs/tensorboard_timeseries.png and docs/tensorboard_hparams.png"
