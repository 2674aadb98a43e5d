"""The two endpoint adapters of the shared request path (request_path.py): what chat completions
and text completions do differently, and nothing else."""

from __future__ import annotations

from typing import TYPE_CHECKING

from splitserve.api.agent import chat_template_for, request_grammar_or_400, tool_plan_or_400
from splitserve.api.errors import APIError
from splitserve.api.protocol import ChatCompletionRequest, CompletionRequest
from splitserve.api.request_path import SubRequest
from splitserve.structured.tool_stream import ToolCallStream, chat_message

if TYPE_CHECKING:
    from splitserve.api.server import ServerState

MAX_COMPLETIONS_PER_REQUEST = 64  # prompts x n


def chat_logprobs(tok, entries) -> list[dict]:
    return [{
        "token": tok.token_text(e.token_id), "logprob": e.logprob, "bytes": tok.token_bytes(e.token_id),
        "top_logprobs": [{"token": tok.token_text(t), "logprob": lp, "bytes": tok.token_bytes(t)} for t, lp in e.top],
    } for e in entries]


def completion_logprobs(tok, entries, text_offset: int) -> dict:
    tokens, token_lps, tops, offsets = [], [], [], []
    pos = text_offset
    for e in entries:
        t = tok.token_text(e.token_id)
        tokens.append(t)
        token_lps.append(e.logprob)
        tops.append({tok.token_text(i): lp for i, lp in e.top} if e.top else None)
        offsets.append(pos)
        pos += len(t)
    return {"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops, "text_offset": offsets}


class ChatEndpoint:
    id_prefix = "chatcmpl"
    object_name = "chat.completion"
    chunk_object = "chat.completion.chunk"

    def __init__(self, state: ServerState, req: ChatCompletionRequest) -> None:
        self.state, self.req = state, req
        self.requested_max_tokens = req.requested_max_tokens()
        self.requested_logprobs = req.requested_logprobs()
        # Structured outputs and tools (api/agent.py): the template, the tool plan, one grammar.
        self.template = chat_template_for(state.chat_template, state.tokenizer.chat_template, req.tools)
        self.tool_plan = tool_plan_or_400(req, state.tool_call_parser, self.template or state.tokenizer.chat_template)
        self.grammar = request_grammar_or_400(req, self.tool_plan)
        self.tool_streams: dict[int, ToolCallStream] = {}

    async def prompts(self) -> list[list[int]]:
        plain = self.state.split_special_tokens or self.req.split_special_tokens
        builder = self.state.prompt_builder
        return [await builder.run(builder.chat_prompt, self.req, plain, self.template)]

    def opening_choices(self, subs: list[SubRequest]) -> list[dict]:
        return [{"index": s.choice.index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                 "finish_reason": None} for s in subs]

    def delta_choice(self, sub: SubRequest, delta: str, logprobs: list) -> dict | list[dict]:
        """One chunk's choice; with tools, the list of choices this piece makes (tool-call deltas)."""
        lp = None
        if sub.params.logprobs is not None and logprobs:
            lp = {"content": chat_logprobs(self.state.tokenizer, logprobs)}
        if self.tool_plan is None or not self.tool_plan.parses_calls:
            return {"index": sub.choice.index, "delta": {"content": delta} if delta else {}, "logprobs": lp,
                    "finish_reason": sub.choice.finish_reason}
        stream = self.tool_streams.setdefault(sub.choice.index, ToolCallStream(self.tool_plan))
        deltas, finish_reason = stream.deltas(delta, sub.choice.finish_reason)
        if not deltas and lp is None and finish_reason is None:
            return []
        deltas = deltas or [{}]
        return [{"index": sub.choice.index, "delta": d, "logprobs": lp if i == 0 else None,
                 "finish_reason": finish_reason if i == len(deltas) - 1 else None} for i, d in enumerate(deltas)]

    def final_choice(self, sub: SubRequest) -> dict:
        c = sub.choice
        lp = {"content": chat_logprobs(self.state.tokenizer, c.logprobs)} if sub.params.logprobs is not None else None
        message, finish_reason = chat_message(c.text, c.finish_reason, self.tool_plan)
        return {"index": c.index, "message": message, "logprobs": lp,
                "finish_reason": finish_reason, "stop_reason": c.stop_reason}


class CompletionEndpoint:
    id_prefix = "cmpl"
    object_name = "text_completion"
    chunk_object = "text_completion"

    def __init__(self, state: ServerState, req: CompletionRequest) -> None:
        self.state, self.req = state, req
        self.requested_max_tokens = req.max_tokens
        self.requested_logprobs = req.logprobs
        self.grammar = request_grammar_or_400(req, None)  # vLLM's structured_outputs / guided_*
        self.echo_text: dict[int, str] = {}
        self.offsets: dict[int, int] = {}  # characters streamed so far per choice, for text_offset

    async def prompts(self) -> list[list[int]]:
        req, builder = self.req, self.state.prompt_builder
        try:
            raw = req.prompts()
        except ValueError as exc:
            raise APIError(400, str(exc), param="prompt") from None
        if len(raw) * req.n > MAX_COMPLETIONS_PER_REQUEST:
            raise APIError(400, f"at most {MAX_COMPLETIONS_PER_REQUEST} completions (prompts x n) per request",
                           param="prompt")
        plain = self.state.split_special_tokens or req.split_special_tokens
        prompts = [await builder.run(builder.completion_prompt, p, plain) for p in raw]
        if req.echo:
            tok = self.state.tokenizer
            for p_idx, ids in enumerate(prompts):
                text = tok.decode(ids, skip_special_tokens=False)
                for j in range(req.n):
                    self.echo_text[p_idx * req.n + j] = text
        return prompts

    def opening_choices(self, subs: list[SubRequest]) -> list[dict]:
        self.offsets = {s.choice.index: len(self.echo_text.get(s.choice.index, "")) for s in subs}
        return [{"index": idx, "text": text, "logprobs": None, "finish_reason": None}
                for idx, text in self.echo_text.items()]

    def delta_choice(self, sub: SubRequest, delta: str, logprobs: list) -> dict:
        c = sub.choice
        lp = None
        if sub.params.logprobs is not None and logprobs:
            lp = completion_logprobs(self.state.tokenizer, logprobs, self.offsets[c.index])
        self.offsets[c.index] += len(delta)
        return {"index": c.index, "text": delta, "logprobs": lp, "finish_reason": c.finish_reason}

    def final_choice(self, sub: SubRequest) -> dict:
        c = sub.choice
        prefix = self.echo_text.get(c.index, "")
        lp = None
        if sub.params.logprobs is not None:
            lp = completion_logprobs(self.state.tokenizer, c.logprobs, len(prefix))
            if sub.params.prompt_logprobs is not None:
                lp = self._with_prompt(sub, lp)
        return {"index": c.index, "text": prefix + c.text, "logprobs": lp, "finish_reason": c.finish_reason,
                "stop_reason": c.stop_reason}

    def _with_prompt(self, sub: SubRequest, generated: dict) -> dict:
        """Echo's logprobs: the prompt's tokens first (the first one has none, as in OpenAI's API)."""
        entries = sub.choice.prompt_logprobs or []
        if len(entries) != len(sub.prompt_ids) - 1:
            raise APIError(503, "the engine did not return the prompt's logprobs; retry", "service_unavailable",
                           code="prompt_logprobs_missing")
        for entry, token in zip(entries, sub.prompt_ids[1:]):
            entry.token_id = token
        tok = self.state.tokenizer
        prompt = completion_logprobs(tok, entries, len(tok.token_text(sub.prompt_ids[0])))
        first = tok.token_text(sub.prompt_ids[0])
        return {"tokens": [first] + prompt["tokens"] + generated["tokens"],
                "token_logprobs": [None] + prompt["token_logprobs"] + generated["token_logprobs"],
                "top_logprobs": [None] + prompt["top_logprobs"] + generated["top_logprobs"],
                "text_offset": [0] + prompt["text_offset"] + generated["text_offset"]}
