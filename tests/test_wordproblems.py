"""The word problems: the generator, the shipped splits, the last-number reward and the task by name."""

from __future__ import annotations

import json
import re

import pytest

from unison.errors import UserError
from unison.tasks import load_task
from unison.tasks.rewards import final_number, last_number_reward, load_reward
from unison.tasks.templates import messages_of
from unison.tasks.wordproblems import ASSET_DIR, SHOTS, TEMPLATES, generate, main, to_jsonl

# each operation computed by hand, refusing a step the generator must never make (a result below 2, a remainder)
STEP = {
    "add": lambda x, y: x + y,
    "sub": lambda x, y: x - y if x - y >= 2 else None,
    "mul": lambda x, y: x * y,
    "div": lambda x, y: x // y if x % y == 0 and x // y >= 2 else None,
}


def shipped(split: str) -> list[dict]:
    return [json.loads(line) for line in (ASSET_DIR / f"{split}.jsonl").read_text().splitlines()]


def user_turns(row: dict) -> list[str]:
    return [m["content"] for m in row["prompt"] if m["role"] == "user"]


# ---------------------------------------------------------------------------------------------- the generator


def test_generator_is_seeded_and_splits_are_disjoint():
    first, again, other = generate(0, 60, 20), generate(0, 60, 20), generate(1, 60, 20)
    assert to_jsonl(first["train"]) == to_jsonl(again["train"]) and to_jsonl(first["test"]) == to_jsonl(again["test"])
    assert first["train"] != other["train"]
    assert [len(first["train"]), len(first["test"])] == [60, 20]
    train, test = {r["question"] for r in first["train"]}, {r["question"] for r in first["test"]}
    assert len(train) == 60 and len(test) == 20 and not train & test


def test_shipped_files_are_the_generators_output():
    rows = generate()
    for split in ("train", "test"):
        assert (ASSET_DIR / f"{split}.jsonl").read_text() == to_jsonl(rows[split]), (
            f"{split}.jsonl differs from `python -m unison.tasks.wordproblems`: rewrite it with that command"
        )


def test_main_writes_both_splits(tmp_path):
    main(["--out", str(tmp_path), "--train", "7", "--test", "3", "--seed", "5"])
    rows = generate(5, 7, 3)
    assert (tmp_path / "train.jsonl").read_text() == to_jsonl(rows["train"])
    assert (tmp_path / "test.jsonl").read_text() == to_jsonl(rows["test"])


def test_a_used_up_template_is_a_user_error(monkeypatch):
    from unison.tasks import wordproblems

    monkeypatch.setattr(wordproblems, "THINGS", ("apples",))
    monkeypatch.setattr(wordproblems, "BOXES", (("box", "boxes"),))
    with pytest.raises(UserError, match="ran out of new"):
        generate(0, 2000, 0)


# ---------------------------------------------------------------------------------------------- the shipped rows


def test_shipped_splits_sizes_levels_and_no_question_twice():
    train, test = shipped("train"), shipped("test")
    assert len(train) == 2000 and len(test) == 200
    for rows, n in ((train, 2000), (test, 200)):
        levels = [r["difficulty"] for r in rows]
        assert [levels.count(x) for x in ("easy", "medium", "hard")] == [0.4 * n, 0.3 * n, 0.3 * n]
        assert [r["id"] for r in rows] == [f"{'train' if n == 2000 else 'test'}-{i:04d}" for i in range(n)]
    questions = [q for row in train + test for q in user_turns(row)]  # the questions and their solved examples
    assert len(questions) == len(set(questions)) == 2200 * (SHOTS + 1)
    assert not {r["question"] for r in train} & {r["question"] for r in test}


@pytest.mark.parametrize("split", ["train", "test"])
def test_every_shipped_answer_is_right(split):
    for row in shipped(split):
        ops, numbers = row["ops"], row["numbers"]
        assert len(numbers) == len(ops) + 1 == row["steps"] + 1 and tuple(ops) in TEMPLATES
        assert (row["difficulty"] == "hard") == (row["steps"] == 2)
        value = numbers[0]
        for op, x in zip(ops, numbers[1:]):
            value = STEP[op](value, x)
            assert value is not None, row["id"]
        assert row["answer"] == str(value), row["id"]
        words = row["question"].replace("?", " ").replace(".", " ").replace(",", " ").split()
        assert sorted(int(w) for w in words if w.isdigit()) == sorted(numbers), row["id"]
        assert row["solution"].endswith(f"The answer is {value}.") and last_number_reward(row["solution"], value)


def test_shipped_prompt_is_system_solved_examples_then_question():
    row = shipped("test")[0]
    roles = [m["role"] for m in row["prompt"]]
    assert roles == ["system"] + ["user", "assistant"] * SHOTS + ["user"]
    assert row["prompt"][-1]["content"] == row["question"]
    for shot in row["prompt"][2:-1:2]:  # each solved example ends with its answer
        assert re.fullmatch(r".+ = (\d+) [a-z ]+\. The answer is \1\.", shot["content"]), shot["content"]


# ---------------------------------------------------------------------------------------------- the reward


@pytest.mark.parametrize(
    "response, answer, reward",
    [
        ("Tom has 3 + 5 = 8 apples. The answer is 8.", "8", 1.0),
        ("Tom has 3 + 5 = 9 apples. The answer is 9.", "8", 0.0),  # wrong
        ("The answer is eight.", "8", 0.0),  # no number: a word is none
        ("", "8", 0.0),
        ("The answer is 8. Then 2 more.", "8", 0.0),  # the right number, but not the last one
        ("8 is wrong, the answer is 9", "8", 0.0),
        ("3 + 5 = 9, no: 3 + 5 = 8", "8", 1.0),  # several numbers, the last one right
        ("They make 1,200 cookies.", "1200", 1.0),  # thousands commas
        ("They make 1,200 cookies.", "200", 0.0),
        ("1, 2, 3", "3", 1.0),  # a list, not a thousands comma
        ("The answer is 8.0.", "8", 1.0),  # a decimal part of zero
        ("The answer is 8.5.", "8", 0.0),
        ("The answer is 8.5.", "5", 0.0),
        ("Each gets 16/2.", "8", 1.0),  # a fraction is its value
        ("Each gets 3/0.", "0", 0.0),
        ("The answer is .5", "5", 0.0),  # ".5" is no number
        ("It is 2 - 5 = -3.", "-3", 1.0),  # negative
        ("It is 2 - 5 = -3.", "3", 0.0),
        ("10-7", "7", 1.0),  # a hyphen after a digit is a minus, not a sign
        ("10-7", "-7", 0.0),
        ("The answer is 8", "not a number", 0.0),
    ],
)
def test_last_number_reward(response, answer, reward):
    assert last_number_reward(response, answer) == reward
    assert load_reward("last-number")(response, answer) == reward


def test_final_number_values():
    assert final_number("3 + 5 = 8 apples.") == 8
    assert final_number("-1,234.50 dollars") == -1234.5
    assert final_number("no digits") is None and final_number(None) is None


# ---------------------------------------------------------------------------------------------- the task


def test_word_problems_task_by_name(tmp_path):
    task = load_task("word-problems")
    train, test = task.examples("train"), task.examples("test", n=5)
    assert task.name == "word-problems" and len(train) == 2000 and len(test) == 5
    assert not {e.prompt for e in train} & {e.prompt for e in task.examples("test")}
    ex = test[0]
    fields = ex.meta["fields"]
    assert ex.prompt == fields["question"] and messages_of(ex)[0]["role"] == "system"
    assert task.reward(fields["solution"], ex, finished=True) == 1.0
    assert task.reward(fields["solution"], ex, finished=False) == 0.0  # cut off
    assert task.reward("The answer is -1.", ex, finished=True) == 0.0
    assert load_task("word-problems", reward="exact").reward(ex.answer, ex, finished=True) == 1.0
    other = tmp_path / "other.jsonl"
    other.write_text('{"prompt": "1 + 1?", "answer": "2"}\n')
    (mine,) = load_task("word-problems", test_path=other).examples("test")
    assert mine.prompt == "1 + 1?"


def test_eval_reads_the_test_split(tiny_dir):
    from unison.commands import EvalConfig, run_eval
    from unison.config import DataConfig, ModelConfig, RolloutConfig, RunBase

    cfg = EvalConfig(
        model=ModelConfig(path=str(tiny_dir)),
        data=DataConfig(source="word-problems", max_prompts=2),
        rollout=RolloutConfig(group_size=1, max_new_tokens=2),
        run=RunBase(out="", progress=False, threads="1"),
    )
    result = run_eval(cfg.validate())
    assert [p["id"][:5] for p in result["per_prompt"]] == ["test-", "test-"]
