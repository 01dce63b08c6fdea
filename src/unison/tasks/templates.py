"""Prompt templates: an `Example` to the token ids the model sees before its response.

    plain   the prompt text as is (no special tokens added); with a system prompt, "system\\n\\nprompt"
    chat    the tokenizer's chat template over the example's messages (or one user message), with the
            generation prompt appended (e.g. "<|im_start|>assistant\\n")
    auto    chat when the tokenizer has a chat template, else plain

A plain template over a multi-message chat joins the messages' contents with blank lines.
"""

from __future__ import annotations

from collections.abc import Mapping

from unison.errors import UserError, choose
from unison.tasks.base import Example


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def messages_of(example: Example, system_prompt: str | None = None) -> list[dict]:
    """The example's chat (or one user message with its prompt), with `system_prompt` first unless it has one."""
    messages = list(example.meta.get("messages") or [{"role": "user", "content": example.prompt}])
    if system_prompt and not (messages and messages[0].get("role") == "system"):
        messages.insert(0, {"role": "system", "content": system_prompt})
    return messages


def plain_text(example: Example, system_prompt: str | None = None) -> str:
    messages = example.meta.get("messages")
    text = "\n\n".join(m["content"] for m in messages) if messages and len(messages) > 1 else example.prompt
    return f"{system_prompt}\n\n{text}" if system_prompt else text


def _plain(tokenizer, example: Example, system_prompt: str | None) -> list[int]:
    return list(tokenizer(plain_text(example, system_prompt), add_special_tokens=False)["input_ids"])


def _ids(out) -> list[int]:
    """apply_chat_template's ids: a list, a nested list, a tensor, or (transformers 5) a dict / BatchEncoding."""
    if isinstance(out, Mapping) or hasattr(out, "input_ids"):
        out = out["input_ids"]
    if hasattr(out, "tolist"):
        out = out.tolist()
    if out and isinstance(out[0], (list, tuple)):  # a batch of one
        out = out[0]
    return [int(i) for i in out]


def _chat(tokenizer, example: Example, system_prompt: str | None) -> list[int]:
    if not has_chat_template(tokenizer):
        raise UserError(
            "the tokenizer has no chat template, so data.template=chat cannot be used; "
            "set data.template=plain (or auto)"
        )
    try:
        out = tokenizer.apply_chat_template(
            messages_of(example, system_prompt), add_generation_prompt=True, tokenize=True
        )
    except Exception as exc:  # noqa: BLE001 - jinja raises its own errors (e.g. "system role not supported")
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise UserError(
            f"the tokenizer's chat template failed on prompt {example.id or example.prompt[:40]!r} ({first}); "
            "drop system_prompt or set data.template=plain"
        ) from None
    return _ids(out)


def _auto(tokenizer, example: Example, system_prompt: str | None) -> list[int]:
    encode = _chat if has_chat_template(tokenizer) else _plain
    return encode(tokenizer, example, system_prompt)


TEMPLATES = {"plain": _plain, "chat": _chat, "auto": _auto}


def encode_prompt(tokenizer, example: Example, template: str = "auto", system_prompt: str | None = None) -> list[int]:
    """The prompt's token ids under `template` (plain, chat or auto)."""
    return choose("template", TEMPLATES, template)(tokenizer, example, system_prompt)
