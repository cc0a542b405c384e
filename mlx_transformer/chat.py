"""Chat conversations: checking `{"messages": [...]}`, rendering them with the tokenizer's chat
template as transformers does, and cutting them into prompt/completion examples.

Rendering follows transformers' `apply_chat_template`: a jinja2 sandbox
(`ImmutableSandboxedEnvironment`, trim_blocks, lstrip_blocks, loop controls), its `tojson`
(no HTML escaping), `raise_exception` and `strftime_now`, and the variables `messages`,
`add_generation_prompt`, `tools`, `documents` and the special tokens (`bos_token`, ...).
`{% generation %}` blocks render their body.

Training on a conversation (`chat_examples`): the loss covers the assistant turns only. Each
assistant turn is one prompt/completion example: the prompt is the conversation before it with
the generation prompt (`add_generation_prompt=True`), the completion is what the template adds
for that turn, its end-of-turn marker included. Every assistant turn is learned once, with the
whole conversation before it in view.

Imports no MLX.
"""

from __future__ import annotations

import functools
import json
from datetime import datetime
from typing import Any

from .errors import UserError


def check_messages(messages: Any, where: str) -> list[dict]:
    """`messages` as a list of {"role": str, "content": str, ...} holding an assistant turn;
    else one line naming `where` (e.g. "data.jsonl:3") and the field."""
    if not isinstance(messages, list) or not messages:
        raise UserError(f'{where}: "messages" must be a non-empty list of {{"role", "content"}}')
    for k, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise UserError(f'{where}: messages[{k}] needs a string "role"')
        if not isinstance(message.get("content"), str):
            raise UserError(f"{where}: messages[{k}].content must be a string")
    if not any(m["role"] == "assistant" for m in messages):
        raise UserError(
            f'{where}: no assistant turn in "messages" (the loss is on assistant turns only, so '
            "there is nothing to learn); add one or drop the line"
        )
    return messages


def render_chat(tokenizer, messages: list[dict], add_generation_prompt: bool = False) -> str:
    """`messages` rendered with `tokenizer.chat_template`.

    Raises:
        UserError: the tokenizer has no chat template, or the template fails on these messages.
    """
    template = getattr(tokenizer, "chat_template", None)
    if template is None:
        where = tokenizer.path if getattr(tokenizer, "path", None) is not None else "the tokenizer"
        raise UserError(
            f"{where}: the tokenizer has no chat template (no chat_template in "
            "tokenizer_config.json nor chat_template.jinja); use a chat model's tokenizer, or "
            "plain prompts without --chat"
        )
    source = getattr(tokenizer, "chat_template_source", "the chat template")

    try:
        compiled = _compile(template)
        return compiled.render(
            messages=messages,
            tools=None,
            documents=None,
            add_generation_prompt=add_generation_prompt,
            **getattr(tokenizer, "special_tokens", {}),
        )
    except Exception as e:  # the template is data: whatever it raises is its failure
        detail = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise UserError(f"{source}: the chat template failed to render: {detail}") from None


def chat_examples(tokenizer, messages: list[dict], where: str) -> list[tuple[str, str]]:
    """(prompt, completion) texts, one per assistant turn (see the module docstring)."""
    examples = []
    for k, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = _render_at(tokenizer, messages[:k], True, where)
        full = _render_at(tokenizer, messages[: k + 1], False, where)
        if not full.startswith(prompt) or len(full) == len(prompt):
            raise UserError(
                f"{where}: the chat template does not render messages[{k}] (assistant) as a "
                "continuation of the conversation before it with the generation prompt, so its "
                "tokens cannot be told apart for the loss; use a template that does"
            )
        examples.append((prompt, full[len(prompt) :]))
    return examples


def _render_at(tokenizer, messages, add_generation_prompt, where) -> str:
    try:
        return render_chat(tokenizer, messages, add_generation_prompt)
    except UserError as e:
        raise UserError(f"{where}: {e}") from None


@functools.lru_cache(maxsize=8)
def _compile(template: str):
    import jinja2
    from jinja2.ext import Extension, loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Generation(Extension):
        """`{% generation %}...{% endgeneration %}` (transformers' assistant-mask marker)."""

        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(["name:endgeneration"], drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(
                lineno
            )

        def _body(self, caller):
            return caller()

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(
            x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
        )

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[Generation, loopcontrols]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(template)
    except jinja2.TemplateSyntaxError as e:
        raise jinja2.TemplateError(f"syntax error at line {e.lineno}: {e.message}") from None


def ends_with_eos(tokenizer, completion: str) -> bool:
    """Whether a rendered assistant turn already ends with the eos token (then training adds
    none after it; otherwise eos follows, so that generation learns to stop)."""
    eos = getattr(tokenizer, "special_tokens", {}).get("eos_token")
    return bool(eos) and completion.rstrip().endswith(eos)
