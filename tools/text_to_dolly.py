"""Turn a plain-text play (e.g. tinyshakespeare) into Dolly-format records, for runs without Dolly.

Each speech (a block between blank lines) becomes one record: the instruction asks for the next
speech, the context is the speech before it, the response is the speech itself.

    python tools/text_to_dolly.py tinyshakespeare.txt data/shakespeare-dolly.jsonl
"""
import json
import sys
from pathlib import Path


def main(source: str, target: str) -> None:
    speeches = [s.strip() for s in Path(source).read_text(encoding="utf-8").split("\n\n") if s.strip()]
    with open(target, "w", encoding="utf-8") as f:
        for previous, speech in zip(speeches, speeches[1:]):
            f.write(json.dumps({"instruction": "Write the next speech of the play.", "context": previous,
                                "response": speech, "category": "creative_writing"}) + "\n")
    print(f"{len(speeches) - 1} records written to {target}")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: python tools/text_to_dolly.py INPUT.txt OUTPUT.jsonl")
    main(sys.argv[1], sys.argv[2])
