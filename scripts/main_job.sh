#!/usr/bin/env bash
# The main job of `make run`: a generation on the built-in tiny-random model, baseline and FastV side by side.
set -euo pipefail
MMKIT=.venv/bin/mmkit
PY=.venv/bin/python
mkdir -p runs
$PY - <<'PY'
from PIL import Image, ImageDraw
img = Image.new("RGB", (336, 336), (40, 60, 80))
d = ImageDraw.Draw(img)
d.ellipse((40, 40, 150, 150), fill=(220, 40, 40))
d.rectangle((190, 180, 300, 290), fill=(40, 200, 60))
img.save("runs/demo.png")
PY
for spec in "" "fastv:layer=2,keep=0.25"; do
  args=(generate --model tiny-random --image runs/demo.png --prompt "Describe the image in detail." --max-new-tokens 16 --json)
  [ -n "$spec" ] && args+=(--method "$spec")
  $MMKIT "${args[@]}"
done | $PY -c '
import json, sys
rows = [json.loads(line) for line in sys.stdin]
print(f"{\"methods\":<28} {\"visual tokens\":>13} {\"kept (mean/layer)\":>18} {\"prefill ms\":>11}  answer")
for r in rows:
    print(f"{\",\".join(r[\"methods\"]) or \"baseline\":<28} {r[\"visual_tokens\"]:>13} {r[\"visual_tokens_kept\"]:>18.1f} {r[\"prefill_ms\"]:>11.1f}  {r[\"text\"]!r}")
'
