"""From request body to prompt token ids: off the event loop, and bounded before any costly step.

JSON parsing, validation, chat-template rendering and tokenization of a large request take
seconds of CPU; on the event loop they would stall `/health` and every stream. They run here, in
a small thread pool, and each is bounded first:

- the JSON tree's depth and its strings (no lone surrogates) are checked before validation;
- a text of N characters needs at least N / `max_token_bytes` tokens, so a prompt or a
  conversation too long for `max_model_len` is refused before rendering or tokenizing it;
- a chat template renders within `RenderLimits` (work, size, time).
"""

from __future__ import annotations

import asyncio
import json
import re
import uuid
from concurrent.futures import ThreadPoolExecutor

from splitserve.api.errors import APIError
from splitserve.api.protocol import ChatCompletionRequest
from splitserve.models.chat_template import ChatTemplateError
from splitserve.models.template_limits import LimitKind, RenderLimits
from splitserve.models.tokenizer import Tokenizer

MAX_JSON_DEPTH = 100
_SURROGATE = re.compile("[\ud800-\udfff]")
# Roles whose content is the user's (or an outside source's) text, for `split_special_tokens`.
_UNTRUSTED_ROLES = ("user", "tool")


def check_json_tree(body) -> None:
    """Refuse nesting deeper than MAX_JSON_DEPTH and strings holding lone surrogates (they
    cannot be encoded as UTF-8, so they would fail later, deep inside the tokenizer)."""
    stack = [(body, 1, "")]
    while stack:
        node, depth, path = stack.pop()
        if depth > MAX_JSON_DEPTH:
            raise APIError(400, f"{path or 'body'}: nested deeper than {MAX_JSON_DEPTH} levels", param=path or None)
        items = node.items() if isinstance(node, dict) else enumerate(node)
        for key, value in items:
            if isinstance(key, str) and _SURROGATE.search(key):
                raise APIError(400, f"{path or 'body'}: a key holds a lone surrogate (invalid Unicode)")
            if isinstance(value, str):
                if _SURROGATE.search(value):
                    where = f"{path}.{key}" if isinstance(key, str) else f"{path}[{key}]"
                    where = where.lstrip(".")
                    raise APIError(400, f"{where}: lone surrogate (invalid Unicode) in a string", param=where)
            elif isinstance(value, (dict, list)):
                where = f"{path}.{key}" if isinstance(key, str) else f"{path}[{key}]"
                stack.append((value, depth + 1, where.lstrip(".")))


def parse_body(raw: bytes, cls):
    """Bytes -> a validated request model (pydantic's ValidationError passes through)."""
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError):
        raise APIError(400, "request body is not valid JSON") from None
    if not isinstance(body, dict):
        raise APIError(400, "request body must be a JSON object")
    check_json_tree(body)
    return cls.model_validate(body)


class PromptBuilder:
    """Prompt preparation for one tokenizer and context length, run in its own threads."""

    def __init__(self, tokenizer: Tokenizer, max_model_len: int, threads: int = 2, max_pending: int = 256) -> None:
        self.tokenizer = tokenizer
        self.max_model_len = max_model_len
        self.executor = ThreadPoolExecutor(threads, thread_name_prefix="splitserve-prompt")
        self.max_pending = max_pending
        self.pending = 0
        # A normalizer (NFKC, ...) may shorten the text before tokenizing: leave room for it.
        self.chars_per_token = tokenizer.max_token_bytes * (4 if tokenizer.may_shrink_text else 1)
        self.max_prompt_chars = max_model_len * self.chars_per_token

    async def run(self, fn, *args):
        """`fn(*args)` in the pool; 503 when too much is already waiting for it."""
        if self.pending >= self.max_pending:
            raise APIError(503, "the server is overloaded; retry later", "service_unavailable", code="overloaded")
        self.pending += 1
        try:
            return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)
        finally:
            self.pending -= 1

    def close(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)

    # ---- bounds ----------------------------------------------------------------------------------
    def too_long(self, chars: int, param: str) -> APIError:
        at_least = -(-chars // self.chars_per_token)
        return APIError(400, (
            f"This model's maximum context length is {self.max_model_len} tokens. However, your prompt is at "
            f"least {at_least} tokens long ({chars} characters). Please reduce the length of the prompt."),
            param=param)

    def check_text(self, chars: int, param: str) -> None:
        if chars > self.max_prompt_chars:
            raise self.too_long(chars, param)

    # ---- completions -------------------------------------------------------------------------------
    def completion_prompt(self, prompt: str | list[int], plain: bool) -> list[int]:
        """One prompt: text (BOS added as the model wants) or token ids (checked)."""
        tok = self.tokenizer
        if isinstance(prompt, str):
            self.check_text(len(prompt), "prompt")
            if not plain:
                return tok.encode(prompt)
            bos = [tok.bos_token_id] if tok.add_bos_token and tok.bos_token_id is not None else []
            return bos + tok.encode_plain(prompt)
        if len(prompt) > self.max_model_len:
            raise APIError(400, f"This model's maximum context length is {self.max_model_len} tokens. However, "
                                f"your prompt has {len(prompt)} tokens.", param="prompt")
        if any(not 0 <= t < tok.vocab_size for t in prompt):
            raise APIError(400, f"prompt token ids must be in [0, {tok.vocab_size})", param="prompt")
        return list(prompt)

    # ---- chat --------------------------------------------------------------------------------------
    def chat_prompt(self, req: ChatCompletionRequest, plain: bool, chat_template: str | None = None) -> list[int]:
        """`chat_template`: a template to render instead of the model's (--chat-template, tools)."""
        try:
            messages = req.template_messages()
        except ValueError as exc:
            raise APIError(400, str(exc), param="messages") from None
        self.check_text(sum(len(m["content"]) for m in messages if isinstance(m.get("content"), str)), "messages")
        markers = _mark_untrusted(messages) if plain else {}
        limits = RenderLimits(
            max_output_chars=self.max_prompt_chars + 65536,  # room for the template's own text
            max_value_chars=self.max_prompt_chars + 65536,
            max_work_chars=32 * (self.max_prompt_chars + 65536),
            max_operations=200_000 + 200 * (len(messages) + len(req.tools or ())),
        )
        try:
            text = self.tokenizer.apply_chat_template(
                messages, add_generation_prompt=req.add_generation_prompt and not req.continue_final_message,
                tools=req.tools, continue_final_message=req.continue_final_message, limits=limits,
                chat_template=chat_template, **(req.chat_template_kwargs or {}))
        except ChatTemplateError as exc:
            if exc.limit is LimitKind.OUTPUT:
                raise self.too_long(limits.max_output_chars, "messages") from None
            raise APIError(400, f"could not apply the chat template: {exc}", param="messages") from None
        except ValueError as exc:
            raise APIError(400, f"could not apply the chat template: {exc}", param="messages") from None
        self.check_text(len(text), "messages")
        if markers:
            return self._encode_marked(text, markers)
        return self.tokenizer.encode(text, add_special_tokens=False)  # the template spells BOS itself

    def _encode_marked(self, text: str, markers: dict[str, str]) -> list[int]:
        """The template's text with control tokens parsed; each marked user text as plain text."""
        pattern = re.compile("|".join(re.escape(m) for m in markers))
        found = pattern.findall(text)
        if sorted(found) != sorted(markers):
            raise APIError(400, "split_special_tokens: this model's chat template rewrites user content, so it "
                                "cannot be kept apart as plain text", param="split_special_tokens")
        ids: list[int] = []
        at = 0
        for m in pattern.finditer(text):
            ids += self.tokenizer.encode(text[at:m.start()], add_special_tokens=False)
            ids += self.tokenizer.encode_plain(markers[m.group()])
            at = m.end()
        return ids + self.tokenizer.encode(text[at:], add_special_tokens=False)


def _mark_untrusted(messages: list[dict]) -> dict[str, str]:
    """Swap each user/tool message's text for a unique marker; returns marker -> text."""
    markers = {}
    for msg in messages:
        if msg.get("role") in _UNTRUSTED_ROLES and msg.get("content"):
            marker = f"\ue000{uuid.uuid4().hex}\ue001"  # private-use characters: no template or user spells them
            markers[marker] = msg["content"]
            msg["content"] = marker
    return markers
