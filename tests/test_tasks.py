"""Tasks: math answers, the countdown task, prompt files and their errors, prompt templates, reward loading."""

from __future__ import annotations

import json
import sys
import threading

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from unison.errors import UserError
from unison.models import EOS, build_tokenizer
from unison.tasks import Example, load_task
from unison.tasks.countdown import CountdownTask
from unison.tasks.files import FileTask
from unison.tasks.math import extract_boxed, math_reward
from unison.tasks.rewards import load_reward
from unison.tasks.templates import encode_prompt

# ---------------------------------------------------------------------------------------------- math answers


@pytest.mark.parametrize(
    "response, answer",
    [
        (r"so \boxed{\frac{1}{2}}", "0.5"),
        (r"\boxed{0.5}", r"\frac{1}{2}"),
        (r"\boxed{1/2}", r"\frac12"),
        (r"\boxed{\dfrac{3}{4}}", r"\frac{3}{4}"),
        (r"\boxed{\tfrac{3}{4}}", "0.75"),
        (r"\boxed{1\,000}", "1000"),
        (r"\boxed{\!-\!4}", "-4"),
        (r"\boxed{5\text{ cm}}", "5"),
        (r"\boxed{5}", r"5 \text{ cm}"),
        (r"\boxed{50\%}", "50"),
        (r"\boxed{-3}", "-3"),
        (r"\boxed{\frac{\sqrt{3}}{2}}", r"\frac{\sqrt3}{2}"),
        (r"\boxed{\{1, 2\}}", r"\{2,1\}"),
        (r"\boxed{[1, 2)}", "[1,2)"),
        (r"\boxed{x = 3}", "3"),
        (r"first \boxed{1}, no wait: \boxed{2}", "2"),
        (r"\fbox{7}", "7"),
        (r"\boxed 7.", "7"),
        (r"$\boxed{\left(1,\, 2\right)}$", "(1,2)"),
        (r"\boxed{\frac{1}{2}}", r"\boxed{0.5}"),
    ],
)
def test_math_reward_accepts_equivalent_answers(response, answer):
    assert math_reward(response, answer) == 1.0


@pytest.mark.parametrize(
    "response, answer",
    [
        (r"\boxed{3}", "-3"),
        (r"\boxed{2} then \boxed{1}", "2"),  # the last box counts
        ("the answer is 2", "2"),  # no box
        (r"\boxed{2", "2"),  # cut off inside the box
        (r"\boxed{(1, 2)}", "[1,2]"),
        (r"\boxed{\frac{1}{3}}", "0.5"),
        (r"\boxed{}}{{\frac{", "1"),
        (r"\boxed{9^{9^{9^{9}}}}", "1"),  # would run SymPy for ever
        (r"\boxed{10!!!}", "1"),
        ("\x00\xff" * 50, "1"),
        (None, "1"),
        (r"\boxed{1}", ""),
    ],
)
def test_math_reward_rejects_wrong_or_garbage(response, answer):
    assert math_reward(response, answer) == 0.0


COL12 = r"\begin{pmatrix} 1 \\ 2 \end{pmatrix}"


# (response, answer, unison's reward, math-verify's own verdict on the same pair). math-verify reads vectors,
# matrices and tuples entry by entry; the first-entry bug was unison's: its spacing rule took the `\ ` out of a
# `\\ ` row break, gluing the rows together. Where the two columns differ, math-verify is wrong and unison is right.
@pytest.mark.parametrize(
    "response, answer, reward, math_verify_says",
    [
        pytest.param(rf"\boxed{{{COL12}}}", COL12, 1.0, 1.0, id="pmatrix-equal"),
        pytest.param(r"\boxed{\begin{pmatrix}1\\2\end{pmatrix}}", COL12, 1.0, 1.0, id="pmatrix-no-spaces"),
        pytest.param(rf"\boxed{{{COL12}}}", r"\begin{pmatrix} 1 \\ 3 \end{pmatrix}", 0.0, 0.0, id="pmatrix-entry"),
        pytest.param(rf"\boxed{{{COL12}}}", r"\begin{pmatrix} 2 \\ 2 \end{pmatrix}", 0.0, 0.0, id="pmatrix-first"),
        pytest.param(rf"\boxed{{{COL12}}}", r"\begin{pmatrix} 1 \\ 2 \\ 3 \end{pmatrix}", 0.0, 0.0, id="pmatrix-shape"),
        pytest.param(r"\boxed{\begin{pmatrix} 1 & 2 \end{pmatrix}}", COL12, 0.0, 0.0, id="row-vs-column"),
        pytest.param(
            r"\boxed{\begin{bmatrix} \frac{1}{2} & 1 \\ 2 & \dfrac{3}{4} \end{bmatrix}}",
            r"\begin{bmatrix} 0.5 & 1 \\ 2 & 0.75 \end{bmatrix}",
            1.0,
            1.0,
            id="bmatrix-frac-vs-decimal",
        ),
        pytest.param(
            r"\boxed{\begin{bmatrix} 1 & 1 \\ 2 & 4 \end{bmatrix}}",
            r"\begin{bmatrix} 1 & 1 \\ 2 & 3 \end{bmatrix}",
            0.0,
            0.0,
            id="2x2-entry",
        ),
        pytest.param(
            r"\boxed{\begin{matrix} 1 & 2 \\ 3 & 4 \end{matrix}}",
            r"\begin{pmatrix} 1 & 2 \\ 3 & 4 \end{pmatrix}",
            1.0,
            1.0,
            id="matrix-vs-pmatrix",
        ),
        pytest.param(
            r"\boxed{\begin{pmatrix} 1 & 2 \\ 3 & 4 \end{pmatrix}}",
            r"\begin{pmatrix} 1 & 3 \\ 2 & 4 \end{pmatrix}",
            0.0,
            0.0,
            id="2x2-transposed",
        ),
        # math-verify does not know Bmatrix and reads it as its last entry (so 1,2 "equals" 3,2); unison renames it
        pytest.param(
            r"\boxed{\begin{Bmatrix} 1 \\ 2 \end{Bmatrix}}",
            r"\begin{Bmatrix} 3 \\ 2 \end{Bmatrix}",
            0.0,
            1.0,
            id="Bmatrix-entry",
        ),
        # ...and so it also fails a Bmatrix against the same pmatrix
        pytest.param(r"\boxed{\begin{Bmatrix} 1 \\ 2 \end{Bmatrix}}", COL12, 1.0, 0.0, id="Bmatrix-vs-pmatrix"),
        pytest.param(
            r"\boxed{\begin{smallmatrix} 1 & 2 \\ 3 & 4 \end{smallmatrix}}",
            r"\begin{smallmatrix} 9 & 2 \\ 3 & 4 \end{smallmatrix}",
            0.0,
            1.0,  # math-verify reads a smallmatrix as its last entry too: 4 == 4
            id="smallmatrix-entry",
        ),
        pytest.param(r"\boxed{(1, 2)}", "(1,2)", 1.0, 1.0, id="tuple-equal"),
        pytest.param(r"\boxed{(1, 2)}", "(1,3)", 0.0, 0.0, id="tuple-entry"),
        pytest.param(r"\boxed{(1, 2)}", "(2,1)", 0.0, 0.0, id="tuple-order"),
        pytest.param(r"\boxed{(1, 2, 3)}", "(1,2)", 0.0, 0.0, id="tuple-shape"),
        pytest.param(r"\boxed{\left( \frac{1}{2},\, 2, 3\right)}", "(0.5,2,3)", 1.0, 1.0, id="left-right-equal"),
        pytest.param(r"\boxed{\left( \frac{1}{2},\, 2, 3\right)}", "(0.5,2,4)", 0.0, 0.0, id="left-right-entry"),
        # the `$` cases: math-verify alone is right, unison used to strip the `$` of `\$` and leave `10\`
        pytest.param(r"\boxed{10\$}", "10", 1.0, 1.0, id="dollar-after"),
        pytest.param(r"\boxed{\$10}", "10", 1.0, 1.0, id="dollar-before"),
        pytest.param(r"\boxed{10}", r"\$10", 1.0, 1.0, id="dollar-in-reference"),
        pytest.param(r"\boxed{\$1{,}000}", "1000", 1.0, 1.0, id="dollar-thousands"),
        pytest.param(r"\boxed{\textdollar 10}", "10", 1.0, 1.0, id="textdollar"),
        pytest.param(r"\boxed{10 \text{ dollars}}", r"\$10", 1.0, 1.0, id="dollars-text"),
        pytest.param(r"\boxed{\$10}", r"\$11", 0.0, 0.0, id="dollar-wrong"),
    ],
)
def test_math_reward_vectors_matrices_and_dollars(response, answer, reward, math_verify_says):
    from math_verify import parse, verify

    assert math_reward(response, answer) == reward
    assert float(verify(parse(f"${answer}$"), parse(response))) == math_verify_says


def test_extract_boxed_nested_and_escaped_braces():
    assert extract_boxed(r"\boxed{\frac{1}{\sqrt{2}}} and more") == r"\frac{1}{\sqrt{2}}"
    assert extract_boxed(r"\boxed{\{1,2\}}") == r"\{1,2\}"
    assert extract_boxed(r"\boxed{a} \fbox{b}") == "b"
    assert extract_boxed("none") is None
    assert extract_boxed(r"\boxed{a} \boxed{b") is None


def test_math_reward_works_off_the_main_thread():
    out = []
    thread = threading.Thread(target=lambda: out.append(math_reward(r"\boxed{0.5}", r"\frac{1}{2}")))
    thread.start()
    thread.join(timeout=30)
    assert out == [1.0]


# ---------------------------------------------------------------------------------------------- countdown


def test_countdown_reference_truncated_and_wrong():
    task = CountdownTask()
    ex = task.examples("train", n=3, seed=0)[0]
    ref = task.reference(ex)
    assert task.reward(ref, ex, finished=True) == 1.0
    assert task.reward(ref, ex, finished=False) == 0.0
    assert task.reward(ref[: len(ref) // 2], ex, finished=False) == 0.0
    wrong = ref.rsplit("#", 1)[0] + f"#{int(ex.answer) + 1}"
    assert task.reward(wrong, ex, finished=True) == 0.0


def test_countdown_splits_disjoint_and_seeded():
    task = CountdownTask()
    train, test = task.all_examples("train"), task.all_examples("test")
    assert train and test
    assert not {e.prompt for e in train} & {e.prompt for e in test}
    assert task.examples("train", 20, seed=1) == task.examples("train", 20, seed=1)
    assert task.examples("train", 20, seed=1) != task.examples("train", 20, seed=2)


# ---------------------------------------------------------------------------------------------- prompt files

ROWS = [
    {"prompt": "What is 1/2 + 1/4?", "answer": r"\frac{3}{4}", "level": 1},
    {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}], "answer": 4},
    {"prompt": "3*3?", "answer": "9"},
]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_file_task_jsonl(tmp_path):
    task = FileTask(write_jsonl(tmp_path / "p.jsonl", ROWS))
    exs = task.examples("train", seed=0)
    assert len(exs) == 3 and task.examples("train", seed=0) == exs
    assert len(task.examples("train", n=2, seed=5)) == 2
    by_prompt = {e.prompt: e for e in exs}
    chat = by_prompt["2+2?"]
    assert chat.answer == "4" and chat.meta["messages"][0]["role"] == "system"
    assert by_prompt["What is 1/2 + 1/4?"].meta["fields"] == {"level": 1}
    assert task.reward(r"\boxed{0.75}", by_prompt["What is 1/2 + 1/4?"], finished=True) == 1.0
    assert task.reward(r"\boxed{0.75}", by_prompt["What is 1/2 + 1/4?"], finished=False) == 0.0
    assert task.examples("test") == task.examples("train")  # no test_path: the same file


def test_file_task_parquet_keys_and_test_path(tmp_path):
    table = pa.table({"question": ["1+1?", "2+3?"], "solution": ["2", "5"]})
    pq.write_table(table, tmp_path / "train.parquet")
    write_jsonl(tmp_path / "test.jsonl", [{"question": "9-1?", "solution": "8"}])
    task = load_task(
        str(tmp_path / "train.parquet"),
        prompt_key="question",
        answer_key="solution",
        test_path=tmp_path / "test.jsonl",
        reward="exact",
    )
    assert {e.prompt for e in task.examples("train")} == {"1+1?", "2+3?"}
    (test,) = task.examples("test")
    assert test.answer == "8" and task.reward(" 8\n", test, finished=True) == 1.0


def test_file_task_answer_optional(tmp_path):
    task = FileTask(write_jsonl(tmp_path / "p.jsonl", [{"prompt": "hi"}]), require_answer=False)
    assert task.examples()[0].answer == ""


def test_load_task_builtin():
    assert isinstance(load_task("builtin"), CountdownTask)
    assert isinstance(load_task("countdown"), CountdownTask)
    assert load_task("countdown-long").name == "countdown-long"


def test_countdown_long_responses_run_from_300_to_1500_tokens():
    from unison.models import build_tokenizer

    task, tok = load_task("countdown-long"), build_tokenizer()
    train, test = task.all_examples("train"), task.all_examples("test")
    assert len(train) > 1000 and test and not {e.prompt for e in train} & {e.prompt for e in test}
    lengths = [len(tok(task.reference(e), add_special_tokens=False).input_ids) + 1 for e in train]  # with EOS
    assert 300 <= min(lengths) and max(lengths) <= 1500
    assert max(int(e.prompt.split("-")[0]) for e in train) < 1000  # the same arithmetic: three digits at most
    ex = train[0]
    assert task.reward(task.reference(ex), ex, True) == 1.0
    with pytest.raises(UserError, match="own reward"):
        load_task("builtin", reward="math")


def _bad(tmp_path, name, content):
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    return path


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("empty.jsonl", "\n\n", "has no rows"),
        ("bad.jsonl", '{"prompt": "a", "answer": "1"}\n{"prompt": "b",\n', "line 2 is not valid JSON"),
        (
            "latin.jsonl",
            b'{"prompt": "a", "answer": "1"}\n{"prompt": "caf\xe9", "answer": "1"}\n',
            "line 2 is not UTF-8",
        ),
        (
            "cols.jsonl",
            '{"question": "a", "answer": "1"}\n',
            "no column 'prompt' (columns: question, answer); set data.prompt_key",
        ),
        ("noans.jsonl", '{"prompt": "a"}\n', "line 1 has no answer column 'answer'"),
        (
            "emptyans.jsonl",
            '{"prompt": "a", "answer": "1"}\n{"prompt": "b", "answer": " "}\n',
            "line 2 has an empty answer",
        ),
        ("num.jsonl", '{"prompt": 5, "answer": "1"}\n', "prompt in 'prompt' is a int"),
        ("msgs.jsonl", '{"prompt": [{"role": "user"}], "answer": "1"}\n', "message 0"),
        ("list.jsonl", "[1, 2]\n", "not an object"),
        ("data.csv", "prompt,answer\n", "extension '.csv'"),
        ("junk.parquet", "not parquet", "not a readable Parquet file"),
    ],
)
def test_file_task_bad_input(tmp_path, name, content, message):
    path = _bad(tmp_path, name, content)
    with pytest.raises(UserError) as err:
        FileTask(path)
    assert message in str(err.value) and name in str(err.value)
    assert "\n" not in str(err.value)


def test_file_task_missing_path_directory_and_parquet_column(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        FileTask(tmp_path / "nope.jsonl")
    with pytest.raises(UserError, match="is a directory"):
        FileTask(tmp_path)
    pq.write_table(pa.table({"q": ["a"], "answer": ["1"]}), tmp_path / "x.parquet")
    with pytest.raises(UserError, match=r"x.parquet has no column 'prompt' \(columns: q, answer\)"):
        FileTask(tmp_path / "x.parquet")


# ---------------------------------------------------------------------------------------------- templates

CHAT = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def test_plain_template():
    tok = build_tokenizer()
    ex = Example(prompt="47-9:", answer="2")
    ids = encode_prompt(tok, ex, "plain")
    assert tok.decode(ids) == "47-9:" and len(ids) == 5
    assert encode_prompt(tok, ex, "auto") == ids  # no chat template: plain
    assert tok.decode(encode_prompt(tok, ex, "plain", system_prompt="S")) == "S\n\n47-9:"
    with pytest.raises(UserError, match="template=plain"):
        encode_prompt(tok, ex, "chat")
    with pytest.raises(UserError, match="choose one of"):
        encode_prompt(tok, ex, "jinja")


def test_chat_template():
    tok = build_tokenizer()
    tok.chat_template = CHAT
    ex = Example(prompt="2+2?", answer="4")
    want = "<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n"
    ids = encode_prompt(tok, ex, "chat")
    assert ids == tok(want, add_special_tokens=False)["input_ids"]
    assert encode_prompt(tok, ex, "auto") == ids
    with_system = tok.decode(encode_prompt(tok, ex, "chat", system_prompt="Be brief."))
    assert with_system.startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n2+2?")
    msgs = [{"role": "system", "content": "S"}, {"role": "user", "content": "Q"}]
    chat_ex = Example(prompt="Q", answer="1", meta={"messages": msgs})
    assert tok.decode(encode_prompt(tok, chat_ex, "chat", system_prompt="ignored")).count("system") == 1
    assert EOS not in tok.decode(ids)


# ---------------------------------------------------------------------------------------------- rewards


def test_builtin_rewards():
    assert load_reward("math")(r"\boxed{1/2}", "0.5") == 1.0
    assert load_reward("exact")("  yes\n", "yes") == 1.0
    assert load_reward("exact")("yes!", "yes") == 0.0
    assert load_reward("countdown")("9,4\n#4", "4") == 1.0
    assert load_reward("countdown")("9,4\n#3", "4") == 0.0
    with pytest.raises(UserError, match="unknown reward 'maths'; choose one of: countdown, exact, last-number, math"):
        load_reward("maths")


def test_user_reward_by_path(tmp_path, monkeypatch):
    (tmp_path / "my_rewards_mod.py").write_text(
        "def length(response, answer):\n    return len(response) == int(answer)\n"
        "def with_example(response, answer, example=None):\n    return example.meta['fields']['w']\n"
        "def bad(response, answer):\n    return 'x'\n"
        "NOT_A_FUNCTION = 3\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    assert load_reward("my_rewards_mod:length")("abc", "3") == 1.0
    assert load_reward("my_rewards_mod.length")("ab", "3") == 0.0
    assert load_reward(f"{tmp_path / 'my_rewards_mod.py'}:length")("abc", "3") == 1.0
    ex = Example(prompt="p", answer="a", meta={"fields": {"w": 0.25}})
    assert load_reward("my_rewards_mod:with_example")("r", "a", example=ex) == 0.25
    with pytest.raises(UserError, match="returned 'x'"):
        load_reward("my_rewards_mod:bad")("r", "a")
    with pytest.raises(UserError, match="not a function"):
        load_reward("my_rewards_mod:NOT_A_FUNCTION")
    with pytest.raises(UserError, match="has no attribute 'missing'"):
        load_reward("my_rewards_mod:missing")
    with pytest.raises(UserError, match=r"cannot import 'no_such_pkg.mod'.*ModuleNotFoundError.*PYTHONPATH"):
        load_reward("no_such_pkg.mod:score")
    sys.modules.pop("my_rewards_mod", None)
