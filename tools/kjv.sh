#!/bin/sh
# Writes the King James Bible (Debian's bible-kjv package) as plain training text: Genesis to Jude
# for training, the Book of Revelation held out for validation.
#   train.txt, valid.txt     one verse per line under chapter headings
#   train-both.txt           the same text twice: one verse per line, then as the `bible` command
#                            prints it (wrapped at 80 columns, indented verse numbers)
#   valid-printed.txt        Revelation as `bible` prints it
#   tools/kjv.sh [OUT_DIR]     (default data/kjv)
set -eu
out=${1:-data/kjv}
if ! command -v bible >/dev/null 2>&1; then
    echo "tools/kjv.sh: needs the bible command: sudo apt-get install bible-kjv" >&2
    exit 1
fi
mkdir -p "$out"
# The bible command wraps verses at 80 columns; join each verse onto one line.
join_verses() {
    awk '
        /^  *[0-9]+ / { if (verse != "") print verse; sub(/^ +/, ""); verse = $0; next }
        /^$/          { if (verse != "") print verse; verse = ""; print ""; next }
        verse != ""   { verse = verse " " $0; next }
                      { print }
        END           { if (verse != "") print verse }
    '
}
bible "Gen1:1-Jude1:25" | join_verses > "$out/train.txt"
bible "Rev1:1-Rev22:21" | join_verses > "$out/valid.txt"
{ cat "$out/train.txt"; bible "Gen1:1-Jude1:25"; } > "$out/train-both.txt"
bible "Rev1:1-Rev22:21" > "$out/valid-printed.txt"
echo "tools/kjv.sh: wrote $out/train.txt ($(wc -c < "$out/train.txt") bytes) and $out/valid.txt ($(wc -c < "$out/valid.txt") bytes)"
