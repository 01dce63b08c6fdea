"""Grade-school arithmetic word problems (`data.source=word-problems`): a shipped train split and a held-out test split.

    question:  "Mia has 7 stickers. She buys 5 more stickers. How many stickers does Mia have now?"
    response:  "Mia has 7 + 5 = 12 stickers. The answer is 12."
    answer:    "12"

Each problem is one or two integer operations (addition, subtraction, multiplication, exact division; every step's
result a whole number of at least 2) told as a short story from a few templates per operation, with a varied name,
object and numbers, at one of three difficulty levels (shares of each split in SHARES):

    easy     one step with numbers below 10 (products and quotients within the tables up to 5 x 5)
    medium   one step with numbers up to 20 (products and quotients within the tables up to 10 x 10)
    hard     two steps with small numbers, e.g. "2 bags of 4 pencils, then 3 given away": 2 * 4 - 3

The prompt is a chat: a system message asking for one short sentence that ends with "The answer is N.", then three
solved examples of the same template (other names and numbers), then the question. SmolLM2-135M-Instruct, sampled
at temperature 1, follows that format from the examples where an instruction alone left it rambling (docs/tasks.md
has the measurements); the arithmetic is left to the model.

Every row of the JSONL files holds `id`, `prompt` (that chat), `answer` (the exact integer, as a string), `question`,
`solution` (its worked answer, in the examples' format), `ops` and `numbers` (the answer is the numbers folded left
by the ops: (numbers[0] op0 numbers[1]) op1 numbers[2]), `steps`, `difficulty` and `template`.

The reward (`reward: last-number`, in `unison.tasks.rewards`) is 1.0 when the last number of a finished response
equals the answer exactly, else 0.0 (also for a response cut off at max_new_tokens). A number may carry a sign
("-3"; a hyphen right after a digit or a letter is a minus, not a sign), thousands commas ("1,200"), a decimal part
("8.0" counts as 8, "8.5" does not) or a fraction bar ("16/2" is 8); a number in words is none. Only the last
number counts: a right number earlier in the response earns nothing, so "The answer is 8. Or 9." scores 0 for 8.
A 135M chat model rarely writes \\boxed{}, which the `math` reward needs; any wording that ends on the answer scores.

The files are this module's output, committed: `python -m unison.tasks.wordproblems` rewrites them (seeded, the same
bytes every time), and a test checks that the shipped files equal a fresh run. The test split is drawn first, and a
question already drawn (as a problem or as a solved example) is drawn again, so no question appears twice anywhere:
no problem of one split is a problem or an example of the other.
"""

from __future__ import annotations

import argparse
import json
import operator
import random
from pathlib import Path

from unison.errors import UserError
from unison.tasks.files import FileTask

ASSET_DIR = Path(__file__).resolve().parents[1] / "assets" / "word-problems"
SYSTEM = "You solve arithmetic word problems. Answer in one short sentence and end with 'The answer is' and the number."
FINAL = "The answer is {r}."
SHOTS = 3  # solved examples of the same template before each question
TRIES = 1000  # draws of one problem before a template counts as used up
SEED, TRAIN, TEST = 0, 2000, 200
SHARES = {"easy": 0.4, "medium": 0.3, "hard": 0.3}  # share of each split per difficulty level
OPS = {"add": operator.add, "sub": operator.sub, "mul": operator.mul, "div": operator.floordiv}

NAMES = "Tom Mia Sam Lena Omar Aisha Ben Rosa Kenji Priya Leo Emma Diego Hana Jack Zoe".split()
SHE = {"Mia", "Lena", "Aisha", "Rosa", "Priya", "Emma", "Hana", "Zoe"}
THINGS = (
    "apples,marbles,stickers,pencils,cookies,books,stamps,shells,cards,balloons,crayons,oranges,beads,toy cars,"
    "cupcakes,coins"
).split(",")
BOXES = (
    ("box", "boxes"),
    ("bag", "bags"),
    ("basket", "baskets"),
    ("pack", "packs"),
    ("jar", "jars"),
    ("tray", "trays"),
)

# (question, worked solution) templates by operation sequence: {a}, {b}, {c} are the numbers in order, {v} the
# result of the first step of two and {r} the answer
TEMPLATES = {
    ("add",): (
        (
            "{name} has {a} {things}. {He} buys {b} more {things}. How many {things} does {name} have now?",
            "{name} has {a} + {b} = {r} {things} now.",
        ),
        (
            "There are {a} {things} in a {box} and {b} {things} on the table. How many {things} are there in all?",
            "There are {a} + {b} = {r} {things} in all.",
        ),
        (
            "{name} collected {a} {things} on Monday and {b} {things} on Tuesday. How many {things} did {name} "
            "collect in total?",
            "{name} collected {a} + {b} = {r} {things}.",
        ),
    ),
    ("sub",): (
        (
            "{name} had {a} {things}. {He} gave {b} of them to {friend}. How many {things} does {name} have left?",
            "{name} has {a} - {b} = {r} {things} left.",
        ),
        (
            "{name} had {a} {things} at a yard sale. {He} sold {b} of them. How many {things} does {name} have left?",
            "{name} has {a} - {b} = {r} {things} left.",
        ),
        (
            "{name} has {a} {things} and {friend} has {b} {things}. How many more {things} does {name} have than "
            "{friend}?",
            "{name} has {a} - {b} = {r} more {things} than {friend}.",
        ),
    ),
    ("mul",): (
        (
            "{name} buys {a} {boxes} of {things}. Each {box} holds {b} {things}. How many {things} does {name} buy?",
            "{name} buys {a} * {b} = {r} {things}.",
        ),
        (
            "{name} puts {b} {things} on each of {a} plates. How many {things} are on the plates?",
            "There are {a} * {b} = {r} {things} on the plates.",
        ),
        (
            "{name} gets {b} {things} every day for {a} days. How many {things} does {name} get?",
            "{name} gets {a} * {b} = {r} {things}.",
        ),
    ),
    ("div",): (
        (
            "{name} has {a} {things} and shares them equally among {b} friends. How many {things} does each friend "
            "get?",
            "Each friend gets {a} / {b} = {r} {things}.",
        ),
        (
            "{name} packs {a} {things} into {boxes} of {b}. How many {boxes} does {name} fill?",
            "{name} fills {a} / {b} = {r} {boxes}.",
        ),
        (
            "{name} puts {a} {things} into {b} {boxes}, the same number in each {box}. How many {things} go in each "
            "{box}?",
            "Each {box} gets {a} / {b} = {r} {things}.",
        ),
    ),
    ("mul", "add"): (
        (
            "{name} buys {a} {boxes} of {things} with {b} {things} in each {box}. {He} already had {c} {things}. "
            "How many {things} does {name} have now?",
            "{name} buys {a} * {b} = {v} {things}. {He} has {v} + {c} = {r} {things} now.",
        ),
    ),
    ("mul", "sub"): (
        (
            "{name} has {a} {boxes} with {b} {things} in each {box}. {He} gives {c} {things} to {friend}. How many "
            "{things} does {name} have left?",
            "{name} has {a} * {b} = {v} {things}. {He} has {v} - {c} = {r} {things} left.",
        ),
    ),
    ("add", "mul"): (
        (
            "{name} buys {a} red {boxes} and {b} blue {boxes}. Each {box} holds {c} {things}. How many {things} does "
            "{name} buy?",
            "{name} buys {a} + {b} = {v} {boxes}. That is {v} * {c} = {r} {things}.",
        ),
    ),
    ("add", "div"): (
        (
            "{name} has {a} {things} and {friend} gives {him} {b} more. {name} shares all of them equally among {c} "
            "friends. How many {things} does each friend get?",
            "{name} has {a} + {b} = {v} {things}. Each friend gets {v} / {c} = {r} {things}.",
        ),
    ),
    ("add", "sub"): (
        (
            "{name} had {a} {things}. {He} found {b} more and then lost {c}. How many {things} does {name} have now?",
            "{name} had {a} + {b} = {v} {things}. {He} has {v} - {c} = {r} {things} now.",
        ),
    ),
    ("sub", "mul"): (
        (
            "A class has {a} students and {b} of them are away today. The teacher gives each student who is there {c} "
            "{things}. How many {things} does the teacher give out?",
            "There are {a} - {b} = {v} students. The teacher gives out {v} * {c} = {r} {things}.",
        ),
    ),
    ("div", "add"): (
        (
            "{name} shares {a} {things} equally among {b} friends. One friend already had {c} {things}. How many "
            "{things} does that friend have now?",
            "Each friend gets {a} / {b} = {v} {things}. That friend has {v} + {c} = {r} {things} now.",
        ),
    ),
    ("sub", "div"): (
        (
            "{name} had {a} {things} and ate {b} of them. {He} put the rest into {c} {boxes}, the same number in each "
            "{box}. How many {things} are in each {box}?",
            "{name} has {a} - {b} = {v} {things} left. Each {box} has {v} / {c} = {r} {things}.",
        ),
    ),
}

# the number ranges of a first step by level: (range of the first number, range of the second); for sub the
# second range is that of the result, for div those of the divisor and the result
RANGES = {
    "easy": {"add": ((2, 9), (2, 9)), "sub": ((2, 9), (2, 9)), "mul": ((2, 5), (2, 5)), "div": ((2, 5), (2, 5))},
    "medium": {
        "add": ((5, 20), (5, 20)),
        "sub": ((5, 20), (5, 20)),
        "mul": ((2, 10), (3, 10)),
        "div": ((3, 10), (3, 10)),
    },
    "hard": {"add": ((2, 10), (2, 10)), "sub": ((2, 10), (2, 10)), "mul": ((2, 5), (2, 5)), "div": ((2, 5), (2, 5))},
}


def fold(ops, numbers) -> int:
    """The answer: the numbers folded left by the ops, (numbers[0] op0 numbers[1]) op1 numbers[2] ..."""
    value = numbers[0]
    for op, x in zip(ops, numbers[1:]):
        value = OPS[op](value, x)
    return value


def first_step(op: str, level: str, rng: random.Random) -> tuple[int, int]:
    """The two numbers of a first step at `level`: a sum, a difference of at least 2, a product, an exact quotient."""
    (lo1, hi1), (lo2, hi2) = RANGES[level][op]
    x, y = rng.randint(lo1, hi1), rng.randint(lo2, hi2)
    if op == "sub":
        return x + y, x
    if op == "div":
        return x * y, x
    return x, y


def second_step(op: str, value: int, rng: random.Random) -> int | None:
    """The third number of a two-step problem after a first result `value`, or None when `op` cannot follow it
    (a difference or a quotient would drop below 2)."""
    if op == "add":
        return rng.randint(2, 20)
    if op == "mul":
        return rng.randint(2, 9)
    if op == "sub":
        return rng.randint(2, value - 2) if value >= 4 else None
    divisors = [d for d in range(2, 11) if value % d == 0 and value // d >= 2]
    return rng.choice(divisors) if divisors else None


def numbers_for(ops: tuple[str, ...], level: str, rng: random.Random) -> list[int]:
    """The numbers of one problem with operations `ops` at `level`, every step's result a whole number of at least 2
    (a first step redrawn until a second one can follow it)."""
    while True:
        numbers = list(first_step(ops[0], level, rng))
        if len(ops) == 1:
            return numbers
        third = second_step(ops[1], fold(ops[:1], numbers), rng)
        if third is not None:
            return numbers + [third]


def problem(ops: tuple[str, ...], index: int, level: str, rng: random.Random) -> dict:
    """One problem of template `index` for `ops` at `level`: its question, worked solution, numbers and answer."""
    numbers = numbers_for(ops, level, rng)
    name, friend = rng.sample(NAMES, 2)
    he, him = ("she", "her") if name in SHE else ("he", "him")
    box, boxes = rng.choice(BOXES)
    a, b, c = (numbers + [0])[:3]
    words = dict(
        name=name,
        He=he.capitalize(),
        him=him,
        friend=friend,
        things=rng.choice(THINGS),
        box=box,
        boxes=boxes,
        a=a,
        b=b,
        c=c,
        v=fold(ops[:1], numbers),
        r=fold(ops, numbers),
    )
    question, solution = TEMPLATES[ops][index]
    return {
        "question": question.format(**words),
        "solution": f"{solution.format(**words)} {FINAL.format(**words)}",
        "numbers": numbers,
        "answer": str(words["r"]),
    }


def draw(level: str, rng: random.Random, seen: set[str]) -> dict:
    """One new problem at `level` (its question, and its examples', not in `seen`, which grows) as a row of the
    shipped files without its id: the chat of SHOTS solved examples of the same template, then the question."""
    ops = rng.choice([k for k in TEMPLATES if (len(k) == 2) == (level == "hard")])
    index = rng.randrange(len(TEMPLATES[ops]))
    drawn = []
    for _ in range(TRIES):
        item = problem(ops, index, level, rng)
        if item["question"] not in seen:
            seen.add(item["question"])
            drawn.append(item)
        if len(drawn) == SHOTS + 1:
            break
    else:
        raise UserError(f"template {'-'.join(ops)}-{index} ran out of new {level} questions; ask for fewer problems")
    *shots, main = drawn
    chat = [{"role": "system", "content": SYSTEM}]
    for shot in shots:
        chat += [{"role": "user", "content": shot["question"]}, {"role": "assistant", "content": shot["solution"]}]
    chat.append({"role": "user", "content": main["question"]})
    return {
        "prompt": chat,
        "answer": main["answer"],
        "question": main["question"],
        "solution": main["solution"],
        "ops": list(ops),
        "numbers": main["numbers"],
        "steps": len(ops),
        "difficulty": level,
        "template": f"{'-'.join(ops)}-{index}",
    }


def split_rows(split: str, n: int, rng: random.Random, seen: set[str]) -> list[dict]:
    """`n` new problems (their questions not in `seen`, which grows), SHARES of each level, in a seeded order."""
    levels = [level for level, share in SHARES.items() for _ in range(round(share * n))]
    levels = (levels + ["hard"] * n)[:n]
    rng.shuffle(levels)
    rows = []
    for level in levels:
        rows.append({"id": f"{split}-{len(rows):04d}", **draw(level, rng, seen)})
    return rows


def generate(seed: int = SEED, train: int = TRAIN, test: int = TEST) -> dict[str, list[dict]]:
    """Both splits' rows; the test split is drawn first, and no question appears twice."""
    rng, seen = random.Random(seed), set()
    test_rows = split_rows("test", test, rng, seen)
    return {"train": split_rows("train", train, rng, seen), "test": test_rows}


def to_jsonl(rows: list[dict]) -> str:
    return "".join(json.dumps(row) + "\n" for row in rows)


def write(out: Path, seed: int = SEED, train: int = TRAIN, test: int = TEST) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for split, rows in generate(seed, train, test).items():
        (out / f"{split}.jsonl").write_text(to_jsonl(rows))


def load(reward=None, test_path: str | Path | None = None):
    """The shipped splits as a `FileTask` named `word-problems`, rewarded by `reward` (default `last-number`)."""
    train, test = ASSET_DIR / "train.jsonl", ASSET_DIR / "test.jsonl"
    for path in (train, test):
        if not path.is_file():
            raise UserError(
                f"the word problems' {path.name} is missing from {ASSET_DIR}; reinstall unison or rewrite "
                "it with `python -m unison.tasks.wordproblems`"
            )
    return FileTask(train, reward=reward or "last-number", test_path=test_path or test, name="word-problems")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="Write the word-problem splits (train.jsonl, test.jsonl).")
    ap.add_argument("--out", default=str(ASSET_DIR), help="output folder (default: the shipped one)")
    ap.add_argument("--seed", type=int, default=SEED)
    ap.add_argument("--train", type=int, default=TRAIN, help="problems in the train split")
    ap.add_argument("--test", type=int, default=TEST, help="problems in the test split")
    args = ap.parse_args(argv)
    try:
        write(Path(args.out), args.seed, args.train, args.test)
    except UserError as exc:
        ap.error(str(exc))
    print(f"wrote {args.train} train and {args.test} test problems to {args.out}")


if __name__ == "__main__":
    main()
