#!/bin/sh
# Decode speed with and without MTP drafts on a model that has a trained MTP module, and the share
# of drafts accepted: greedy generation from a short prompt (depth 0) and from a long one (depth
# DEPTH), in bf16 and in Q8_0, the two modes interleaved round by round. Prints one line per run
# and the medians.
#
#   tools/bench_speculative.sh [MODEL] [TEXT] [DEPTH] [ROUNDS] [TOKENS]
#     MODEL   default models/kjv-v3
#     TEXT    where the long prompt comes from (default data/kjv/valid-printed.txt)
#     DEPTH   tokens of the long prompt, about (default 768)
#     ROUNDS  default 5;  TOKENS generated per run, default 200
#
# LATENT names the binary (default target/release/latent).
set -eu
model=${1:-models/kjv-v3}
text=${2:-data/kjv/valid-printed.txt}
depth=${3:-768}
rounds=${4:-5}
tokens=${5:-200}
latent=${LATENT:-target/release/latent}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
# About DEPTH tokens of text: the tokenizer of the demo models gives about 3.6 bytes a token.
head -c $((depth * 36 / 10)) "$text" > "$tmp/long.txt"
printf 'And it came to pass' > "$tmp/short.txt"
for quant in bf16 q8_0; do
  q=""
  [ "$quant" = q8_0 ] && q="--quant q8_0"
  for prompt in short long; do
    for round in $(seq "$rounds"); do
      for spec in mtp off; do
        # shellcheck disable=SC2086
        "$latent" generate --model "$model" $q --temperature 0 --max-tokens "$tokens" \
          --speculative "$spec" < "$tmp/$prompt.txt" > /dev/null 2> "$tmp/err"
        rate=$(sed -n 's/.*generated [0-9]* tokens in [0-9.]* s (\([0-9.]*\) tokens\/s).*/\1/p' "$tmp/err")
        depth_at=$(sed -n 's/.*prompt \([0-9]*\) tokens.*/\1/p' "$tmp/err")
        acc=$(sed -n 's/.*(\([0-9.]*\)%), .*/\1/p' "$tmp/err")
        echo "$quant $prompt($depth_at) $spec round $round: $rate tokens/s${acc:+, $acc% of drafts accepted}"
        echo "$quant $prompt $spec $rate ${acc:-}" >> "$tmp/all"
      done
    done
  done
done
echo
echo "medians ($(sed -n 's/^model name[^:]*: //p' /proc/cpuinfo | head -1)):"
for quant in bf16 q8_0; do
  for prompt in short long; do
    med() { grep "^$quant $prompt $1 " "$tmp/all" | awk '{print $4}' | sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
    on=$(med mtp)
    off=$(med off)
    acc=$(grep "^$quant $prompt mtp " "$tmp/all" | awk '{print $5}' | sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}')
    ratio=$(awk -v a="$on" -v b="$off" 'BEGIN {printf "%.2f", a / b}')
    echo "  $quant $prompt: with MTP $on tokens/s ($acc% accepted), without $off tokens/s: ${ratio}x"
  done
done
