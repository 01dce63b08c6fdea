"""Prompt files: prompts and reference answers from a JSON Lines or Parquet file.

    {"prompt": "What is 1/2 + 1/4?", "answer": "\\frac{3}{4}"}
    {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}], "answer": "4"}

The file's extension picks the reader: `.jsonl` / `.json` (JSON Lines, or one JSON array in a `.json` file) and
`.parquet`. The prompt column holds a string or a chat (a list of {"role", "content"} messages): a chat is kept as
given in `Example.meta["messages"]` and its last user message becomes `Example.prompt`. The other columns travel in
`Example.meta["fields"]` (a user reward function can read them through its `example` argument).

A file is one split; `test_path` may name a separate file for the `test` split. Every problem with a file (missing,
unreadable, a bad line, a missing column, an empty answer) is a `UserError` naming the file and the line.
"""

from __future__ import annotations

import codecs
import json
import random
from collections.abc import Callable
from pathlib import Path

from unison.errors import UserError
from unison.tasks.base import Example
from unison.tasks.rewards import load_reward

JSON_EXTENSIONS = (".jsonl", ".json", ".ndjson")
PARQUET_EXTENSIONS = (".parquet", ".pq")
SPLITS = ("train", "test")


def _columns(names) -> str:
    names = [str(n) for n in names]
    shown = ", ".join(names[:20]) + (f", ... ({len(names)} in all)" if len(names) > 20 else "")
    return shown or "none"


def _check_path(path: str | Path) -> Path:
    p = Path(path).expanduser()
    if not p.exists():
        raise UserError(f"prompt file {str(p)!r} does not exist; give the path of a .jsonl or .parquet file")
    if p.is_dir():
        raise UserError(f"prompt file {str(p)!r} is a directory; give a .jsonl or .parquet file inside it")
    if p.suffix.lower() not in JSON_EXTENSIONS + PARQUET_EXTENSIONS:
        raise UserError(
            f"prompt file {str(p)!r} has extension {p.suffix or '(none)'!r}; unison reads .jsonl/.json "
            "(JSON Lines) and .parquet files: convert it or rename it to match its format"
        )
    return p


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise UserError(f"cannot read prompt file {str(path)!r} ({exc.strerror}); check its permissions") from None


def _read_json_array(path: Path, data: bytes) -> list[tuple[str, object]]:
    try:
        rows = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise UserError(f"{path}: byte {exc.start} is not UTF-8; re-save the file as UTF-8") from None
    except json.JSONDecodeError as exc:
        raise UserError(
            f"{path}: line {exc.lineno} is not valid JSON ({exc.msg}, column {exc.colno}); fix it"
        ) from None
    if not isinstance(rows, list):
        raise UserError(f"{path} holds one JSON {type(rows).__name__}; give a list of objects or one object per line")
    return [(f"item {i}", row) for i, row in enumerate(rows, 1)]


def _read_json_lines(path: Path) -> list[tuple[str, object]]:
    data = _read_bytes(path).removeprefix(codecs.BOM_UTF8)
    if path.suffix.lower() == ".json" and data.lstrip()[:1] == b"[":
        return _read_json_array(path, data)
    rows = []
    for lineno, raw in enumerate(data.split(b"\n"), 1):
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise UserError(
                f"{path}: line {lineno} is not UTF-8 (byte {exc.start} of the line); re-save the file as UTF-8"
            ) from None
        if not text.strip():
            continue
        try:
            row = json.loads(text)
        except json.JSONDecodeError as exc:
            raise UserError(
                f"{path}: line {lineno} is not valid JSON ({exc.msg}, column {exc.colno}); "
                "fix it so that each line holds one JSON object"
            ) from None
        rows.append((f"line {lineno}", row))
    return rows


def _read_parquet(path: Path, prompt_key: str) -> list[tuple[str, object]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise UserError(
            f"{path} is not a readable Parquet file ({first}); re-write it with pyarrow or pandas"
        ) from None
    if table.num_rows and prompt_key not in table.column_names:
        raise UserError(
            f"{path} has no column {prompt_key!r} (columns: {_columns(table.column_names)}); "
            "set data.prompt_key to the column that holds the prompts"
        )
    return [(f"row {i}", row) for i, row in enumerate(table.to_pylist(), 1)]


def read_rows(path: str | Path, prompt_key: str = "prompt") -> list[tuple[str, dict]]:
    """The rows of a prompt file as (where, row) pairs, `where` being "line 3" or "row 3" for messages."""
    p = _check_path(path)
    rows = _read_parquet(p, prompt_key) if p.suffix.lower() in PARQUET_EXTENSIONS else _read_json_lines(p)
    if not rows:
        raise UserError(f"prompt file {str(p)!r} has no rows; add prompts, one JSON object per line")
    for where, row in rows:
        if not isinstance(row, dict):
            raise UserError(
                f"{p}: {where} is a JSON {type(row).__name__}, not an object; "
                f'write one object per line like {{"{prompt_key}": "...", "answer": "..."}}'
            )
    return rows


def _messages(value: list, where: str, path: Path, key: str) -> str:
    """Check a chat message list; its last user message's content."""
    how = f'give a list of {{"role": ..., "content": ...}} objects in {key!r}'
    for i, msg in enumerate(value):
        if not isinstance(msg, dict) or not isinstance(msg.get("role"), str) or not isinstance(msg.get("content"), str):
            raise UserError(
                f"{path}: {where}: message {i} of {key!r} is not a {{role, content}} pair of strings; {how}"
            )
    users = [m["content"] for m in value if m["role"] == "user"]
    if not users:
        raise UserError(f"{path}: {where}: the messages in {key!r} have no 'user' message; add one")
    return users[-1]


class FileTask:
    """Prompts (and reference answers) from a JSONL or Parquet file, rewarded by `reward` (a name or function).

    `require_answer=False` allows rows without an answer (e.g. for the offline probe, which needs no reward).
    The file (and `test_path`) is read and checked here, so a bad file fails before any model is loaded.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        prompt_key: str = "prompt",
        answer_key: str = "answer",
        reward: str | Callable = "math",
        test_path: str | Path | None = None,
        require_answer: bool = True,
        name: str = "",
    ):
        self.path, self.test_path = Path(path).expanduser(), test_path
        self.prompt_key, self.answer_key, self.require_answer = prompt_key, answer_key, require_answer
        self.reward_spec = reward
        self._reward_fn = load_reward(reward)
        self._splits = {"train": self._load(self.path)}
        if test_path is not None:
            self._splits["test"] = self._load(test_path)
        self.name = name or self.path.stem

    def _load(self, path: str | Path) -> list[Example]:
        p = Path(path).expanduser()
        return [self._example(row, where, p) for where, row in read_rows(p, self.prompt_key)]

    def _example(self, row: dict, where: str, path: Path) -> Example:
        pk, ak = self.prompt_key, self.answer_key
        if pk not in row:
            raise UserError(
                f"{path}: {where} has no column {pk!r} (columns: {_columns(row)}); "
                "set data.prompt_key to the column that holds the prompts"
            )
        value, meta = row[pk], {"source": str(path), "where": where}
        if isinstance(value, str):
            if not value.strip():
                raise UserError(f"{path}: {where} has an empty prompt in {pk!r}; fill it in or drop the row")
            prompt = value
        elif isinstance(value, list):
            prompt = _messages(value, where, path, pk)
            meta["messages"] = value
        else:
            raise UserError(
                f"{path}: {where}: the prompt in {pk!r} is a {type(value).__name__}; "
                'give a string or a list of {"role", "content"} messages'
            )
        answer = self._answer(row, where, path)
        meta["fields"] = {k: v for k, v in row.items() if k not in (pk, ak)}
        ident = row.get("id")
        ident = str(ident) if isinstance(ident, (str, int)) else f"{path.stem}:{where.split()[-1]}"
        return Example(prompt=prompt, answer=answer, id=ident, meta=meta)

    def _answer(self, row: dict, where: str, path: Path) -> str:
        ak = self.answer_key
        if ak not in row:
            if not self.require_answer:
                return ""
            raise UserError(
                f"{path}: {where} has no answer column {ak!r} (columns: {_columns(row)}); "
                "set data.answer_key to the column that holds the reference answers"
            )
        value = row[ak]
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            answer = str(value).strip()
        elif value is None:
            answer = ""
        else:
            raise UserError(
                f"{path}: {where}: the answer in {ak!r} is a {type(value).__name__}; give a string or a number"
            )
        if not answer and self.require_answer:
            raise UserError(f"{path}: {where} has an empty answer in {ak!r}; fill it in or drop the row")
        return answer

    def examples(self, split: str = "train", n: int | None = None, seed: int = 0) -> list[Example]:
        """`n` examples of `split` in a seeded shuffle; `test` reads `test_path` when given, else the same file."""
        if split not in SPLITS:
            raise UserError(f"unknown split {split!r}; choose one of: {', '.join(SPLITS)}")
        pool = list(self._splits.get(split, self._splits["train"]))
        random.Random(seed).shuffle(pool)
        return pool if n is None else pool[:n]

    def reward(self, response: str, example: Example, finished: bool) -> float:
        """The reward function's score of a finished response; 0.0 for one cut off before its end."""
        if not finished:
            return 0.0
        return self._reward_fn(response, example.answer, example=example)
