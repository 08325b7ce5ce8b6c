#!/usr/bin/env python3
"""Question-answer pairs drawn from the King James Bible, for the demo model's chat fine-tuning.

Reads the training text tools/kjv.sh writes (one verse per line under chapter headings, Genesis to
Jude; Revelation is held out) and writes one {"messages": [...]} conversation per line:

  - "Who <did something>?" from verses that open with who did it, e.g. Genesis 1:1 gives
    "Who created the heaven and the earth?" -> "God created the heaven and the earth."
  - "What does <Book> <chapter>:<verse> say?" -> the verse.

Answers are one sentence, so that the fine-tuned model learns to answer briefly and end its turn;
every third conversation goes on for two or three turns.

  python3 tools/kjv_qa.py data/kjv/train.txt data/kjv/qa.jsonl [--pairs 6000] [--seed 0]
"""

import argparse
import json
import random
import re

OPENING = r"(?:In the beginning |And |Then |Now |So |But )?"
SUBJECT = r"(?P<subj>the LORD God|the LORD|God|Jesus|[A-Z][a-z]+(?: the [A-Z][a-z]+)?)"
VERB = r"(?P<verb>said|spake|created|made|went|came|called|blessed|gave|took|sent|built|begat|answered|commanded|saw|heard|loved|slew|smote|brought)"
WHO = re.compile(rf"^{OPENING}{SUBJECT} {VERB} (?P<rest>[^.;:,?!]+)[.;:,]")
HEADING = re.compile(r"^(?P<book>(?:[1-3] )?[A-Z][A-Za-z ]+?) (?P<chapter>\d+)$")
VERSE = re.compile(r"^(?P<n>\d+) (?P<text>.+)$")
NOT_SUBJECTS = {"And", "Then", "Now", "So", "But", "For", "Thus", "Behold", "Therefore", "Wherefore", "Also", "Moreover"}
# A pronoun answers nothing: "Who made darkness his secret place?" -> "He made ..." is left out.
PRONOUNS = {"He", "She", "It", "They", "We", "Ye", "You", "Thou", "This", "That", "These", "Those", "There", "Who", "Which", "Then", "All", "Every", "Many", "One"}


def verses(path):
    book, chapter = None, None
    with open(path) as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            m = HEADING.match(line)
            if m:
                book, chapter = m["book"], int(m["chapter"])
                continue
            m = VERSE.match(line)
            if m and book:
                yield book, chapter, int(m["n"]), m["text"]


def sentence(text):
    text = text.strip()
    return text[0].upper() + text[1:] if text else text


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("train")
    ap.add_argument("out")
    ap.add_argument("--pairs", type=int, default=6000)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    who, where = [], []
    for book, chapter, n, text in verses(args.train):
        m = WHO.match(text)
        first = m["subj"].split()[0] if m else ""
        if m and first not in NOT_SUBJECTS and first not in PRONOUNS and len(m["rest"].split()) <= 12:
            q = f"Who {m['verb']} {m['rest'].strip()}?"
            a = f"{sentence(m['subj'])} {m['verb']} {m['rest'].strip()}."
            who.append((q, a))
        if len(text.split()) <= 30:
            where.append((f"What does {book} {chapter}:{n} say?", re.sub(r"[;:,]$", ".", text)))
    rng = random.Random(args.seed)
    rng.shuffle(who)
    rng.shuffle(where)
    # As many "who" questions as the text gives (up to half of --pairs), as many by reference.
    n_who = min(len(who), args.pairs // 2)
    pairs = who[:n_who] + where[: min(n_who, args.pairs - n_who)]
    rng.shuffle(pairs)
    # Every third conversation goes on for two or three turns, so that a second question is
    # answered as briefly as the first.
    conversations, at = [], 0
    while at < len(pairs):
        turns = rng.choice((2, 3)) if len(conversations) % 3 == 2 else 1
        messages = []
        for q, a in pairs[at : at + turns]:
            messages += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
        conversations.append(messages)
        at += turns
    with open(args.out, "w") as f:
        for messages in conversations:
            f.write(json.dumps({"messages": messages}) + "\n")
    print(
        f"{args.out}: {len(conversations)} conversations of {len(pairs)} question-answer pairs "
        f"({n_who} who-questions, as many by reference)"
    )


if __name__ == "__main__":
    main()
