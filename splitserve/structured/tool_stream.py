"""A finished choice's assistant message with its tool calls, and the same answer as OpenAI-style
stream deltas.

Streaming passes content through until a call may be starting (a prefix of the format's marker
is held back), then sends each call as OpenAI does: a delta with index, id, type and name as soon
as the call's name is complete, then its arguments' raw text as it arrives. Arguments of calls in
the canonical form (`{"name": ..., "arguments": ...}`) are that raw text in the non-streamed
answer too, so a stream reassembles to exactly the non-streamed message.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from splitserve.structured.tool_parsers import CALL_HEAD, json_value_end, new_call_id


def chat_message(text: str, finish_reason: str | None, plan) -> tuple[dict, str | None]:
    """The assistant message of a finished choice, tool calls parsed out when the plan asks."""
    if plan is None or not plan.parses_calls:
        return {"role": "assistant", "content": text}, finish_reason
    content, calls = plan.parser.parse(text)
    if not calls:
        return {"role": "assistant", "content": text}, finish_reason
    if not plan.parallel:
        calls = calls[:1]
    content = content.rstrip() if content and content.strip() else None
    message = {"role": "assistant", "content": content, "tool_calls": [c.as_openai() for c in calls]}
    return message, "tool_calls" if finish_reason == "stop" else finish_reason


@dataclass
class _StreamedCall:
    id: str
    args_start: int  # where its arguments begin in the text
    sent: str = ""  # argument text already sent
    end: int | None = None  # one past the arguments, once complete


class ToolCallStream:
    """One choice's deltas. `deltas(piece, finish_reason)` -> (delta dicts, finish reason)."""

    def __init__(self, plan) -> None:
        self.plan = plan
        self.text = ""
        self.emitted = 0  # characters of text already sent as content
        self.in_calls = plan.mode in ("required", "named")
        self.scan_from = 0  # where the next call's head is looked for
        self.calls: list[_StreamedCall] = []

    def deltas(self, piece: str, finish_reason: str | None) -> tuple[list[dict], str | None]:
        self.text += piece
        out: list[dict] = []
        if not self.in_calls:
            safe = self._safe_content_end(self.plan.parser.start_marker)
            if safe is None:
                self.in_calls, self.scan_from = True, self.emitted
            elif safe > self.emitted:
                out.append({"content": self.text[self.emitted : safe]})
                self.emitted = safe
        if self.in_calls:
            out += self._call_deltas()
        if finish_reason is None:
            return out, None
        final, reason = self._final_deltas(finish_reason)
        return out + final, reason

    def _call_deltas(self) -> list[dict]:
        out = []
        while True:
            call = self.calls[-1] if self.calls else None
            if call is not None and call.end is None:
                call.end = json_value_end(self.text, call.args_start)
                upto = call.end if call.end is not None else len(self.text)
                fragment = self.text[call.args_start + len(call.sent) : upto]
                if fragment:
                    call.sent += fragment
                    out.append(_args_delta(len(self.calls) - 1, fragment))
                if call.end is None:
                    return out
                self.scan_from = call.end
            if self.calls and not self.plan.parallel:
                return out
            head = CALL_HEAD.search(self.text, self.scan_from)
            if head is None:
                return out
            new = _StreamedCall(new_call_id(), head.end())
            self.calls.append(new)
            out.append({"tool_calls": [{"index": len(self.calls) - 1, "id": new.id, "type": "function",
                                        "function": {"name": json.loads(f'"{head.group(1)}"'), "arguments": ""}}]})

    def _final_deltas(self, finish_reason: str) -> tuple[list[dict], str | None]:
        message, reason = chat_message(self.text, finish_reason, self.plan)
        if "tool_calls" not in message:  # no call after all: what was held back is content
            rest = self.text[self.emitted :]
            return ([{"content": rest}] if rest else []), reason
        out = []
        head = (message["content"] or "")[self.emitted :]
        if head:
            out.append({"content": head})
        for i, call in enumerate(message["tool_calls"]):
            fn = call["function"]
            if i >= len(self.calls):  # not in canonical form: sent whole, now
                out.append({"tool_calls": [{"index": i, "id": call["id"], "type": "function",
                                            "function": {"name": fn["name"], "arguments": ""}}]})
                out.append(_args_delta(i, fn["arguments"]))
            elif fn["arguments"].startswith(self.calls[i].sent) and fn["arguments"] != self.calls[i].sent:
                out.append(_args_delta(i, fn["arguments"][len(self.calls[i].sent) :]))
        return out, reason

    def _safe_content_end(self, marker: str) -> int | None:
        """How much of the text is surely content (None: a tool call has begun). Trailing
        whitespace and any suffix that could open the marker are held back."""
        text = self.text
        if marker == "{":  # llama3_json: the whole output is calls when it opens with JSON
            head = text.lstrip()
            if head.startswith(("{", "<|python_tag|>")):
                return None
            if not head or "<|python_tag|>".startswith(head):
                return self.emitted
            return len(text.rstrip())
        if marker in text:
            return None
        end = len(text)
        for k in range(min(len(marker) - 1, len(text)), 0, -1):
            if marker.startswith(text[-k:]):
                end = len(text) - k
                break
        return max(self.emitted, len(text[:end].rstrip()))


def _args_delta(index: int, fragment: str) -> dict:
    return {"tool_calls": [{"index": index, "function": {"arguments": fragment}}]}
