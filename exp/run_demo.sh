#!/usr/bin/env bash
# Regenerate every demo output under exp/ with the embedded demo model (CPU), from the repository root:
#   bash exp/run_demo.sh
# Outputs are resumable: delete a file to produce it again.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
M=SmolLM2-135M-Instruct
S=data/samples
EVAL="$PY -m bayling.eval"
COMMON="--device cpu --batch-size 8"

# BayLing-80 format: answers (the demo model as is, and with BayLing's prompt template for a second system)
for set in singleturn.en singleturn.zh multiturn.en; do
  $EVAL answer $COMMON --max-new-tokens 200 --questions $S/questions.$set.jsonl \
    --output exp/BayLing-80/$M/res.samples.$set.jsonl
done
for set in singleturn.en multiturn.en; do
  $EVAL answer $COMMON --max-new-tokens 200 --conv-template BayLing --questions $S/questions.$set.jsonl \
    --output exp/BayLing-80/$M.BayLing-template/res.samples.$set.jsonl
done

# Translation and its scores
$EVAL translate $COMMON --max-new-tokens 64 --src $S/translate.en-zh.en --tgt-lang zh \
  --output exp/translation/$M/hyp.en-zh.zh
$EVAL score-translation --hyp exp/translation/$M/hyp.en-zh.zh --ref $S/translate.en-zh.zh --tgt-lang zh \
  --src $S/translate.en-zh.en --json > exp/translation/$M/score.en-zh.zh.txt

# Constrained translation, with the English and the Chinese instruction
$EVAL constrained $COMMON --max-new-tokens 64 --input $S/constrained.en-zh.jsonl --tgt-lang zh \
  --output exp/constrained_translation/$M/hypo.en-zh.zh.jsonl
$EVAL constrained $COMMON --max-new-tokens 64 --input $S/constrained.en-zh.jsonl --tgt-lang zh --instruction-lang zh \
  --output exp/constrained_translation/$M/hypo.en-zh.zh.zh_prompt.jsonl
for f in hypo.en-zh.zh hypo.en-zh.zh.zh_prompt; do
  $EVAL score-constrained --hyp exp/constrained_translation/$M/$f.jsonl --tgt-lang zh --json \
    > exp/constrained_translation/$M/score.$f.txt
done

# Examination (AGIEval v1 format samples) and accuracy
$EVAL exam $COMMON --max-new-tokens 128 --task-dir $S/agieval --output-dir exp/examination/$M
$EVAL score-exam --pred-dir exp/examination/$M --gold-dir $S/agieval --json > exp/examination/$M/score.txt

# Pairwise judging: the demo model judges, behind FastChat's controller + our worker + FastChat's OpenAI server
LOGS=$(mktemp -d)
export LOGDIR=$LOGS  # FastChat's servers write their own log files there, not into the checkout
$PY -m fastchat.serve.controller --host 127.0.0.1 --port 21001 > "$LOGS/controller.log" 2>&1 & CTL=$!
sleep 5
$PY model_worker.py --device cpu --controller-address http://127.0.0.1:21001 --port 21002 \
  --worker-address http://127.0.0.1:21002 > "$LOGS/worker.log" 2>&1 & WORKER=$!
$PY -m fastchat.serve.openai_api_server --host 127.0.0.1 --port 21003 \
  --controller-address http://127.0.0.1:21001 > "$LOGS/api.log" 2>&1 & API=$!
trap 'kill $API $WORKER $CTL 2>/dev/null || true' EXIT
until curl -sf http://127.0.0.1:21003/v1/models | grep -q "$M"; do sleep 2; done
R=exp/BayLing-80/reviews/$M.vs.$M.BayLing-template
for set in singleturn.en multiturn.en; do
  $EVAL judge --answers exp/BayLing-80/$M/res.samples.$set.jsonl exp/BayLing-80/$M.BayLing-template/res.samples.$set.jsonl \
    --names $M $M.BayLing-template --judge-base-url http://127.0.0.1:21003/v1 --judge-model $M \
    --judge-max-tokens 200 --output $R/review.samples.$set.jsonl
done
$EVAL summarize --reviews $R/review.samples.singleturn.en.jsonl $R/review.samples.multiturn.en.jsonl \
  --chart $R/summary.png > $R/summary.txt
