"""OpenAI request bodies (pydantic, the only place it is used) and their translation to SamplingParams."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field

from splitserve.engine.sampling_params import SamplingParams

MAX_N = 16
MAX_MESSAGES = 4096
VALID_ROLES = ("system", "developer", "user", "assistant", "tool")
MAX_TOKEN_ID = 2**31 - 1  # ids past the vocabulary are refused later, against the model's size

# Template variables a request may set through `chat_template_kwargs`, with their accepted types.
# Only switches that model templates document: `enable_thinking` (Qwen3, SmolLM3, Granite, ...),
# `thinking` (DeepSeek-V3.1) and `reasoning_effort` (gpt-oss). Anything else - above all
# `chat_template`, which would let a client run its own template - is refused.
TEMPLATE_KWARGS: dict[str, tuple[type, ...]] = {"enable_thinking": (bool,), "thinking": (bool,),
                                                 "reasoning_effort": (str,)}
REASONING_EFFORTS = ("low", "medium", "high")
# Names the server itself passes to the template: a kwarg may not override them.
RESERVED_TEMPLATE_NAMES = ("messages", "tools", "documents", "add_generation_prompt", "continue_final_message",
                           "special_tokens", "chat_template", "tokenize", "bos_token", "eos_token", "unk_token",
                           "pad_token")


def check_template_kwargs(kwargs: dict[str, Any]) -> None:
    """Raise ValueError naming the first key that is not an allowed template variable of the right type."""
    for key, value in kwargs.items():
        if key in RESERVED_TEMPLATE_NAMES:
            raise ValueError(f"chat_template_kwargs.{key} is not allowed: `{key}` is set by the server"
                             + (" (a request cannot supply a chat template)" if key == "chat_template" else
                                " from the request itself"))
        if key not in TEMPLATE_KWARGS:
            raise ValueError(f"chat_template_kwargs.{key} is not a supported template variable; "
                             f"allowed: {', '.join(sorted(TEMPLATE_KWARGS))}")
        if not isinstance(value, TEMPLATE_KWARGS[key]):
            raise ValueError(f"chat_template_kwargs.{key} must be of type "
                             f"{' or '.join(t.__name__ for t in TEMPLATE_KWARGS[key])}")
        if key == "reasoning_effort" and value not in REASONING_EFFORTS:
            raise ValueError(f"chat_template_kwargs.reasoning_effort must be one of {', '.join(REASONING_EFFORTS)}")


class StreamOptions(BaseModel):
    include_usage: bool = False
    continuous_usage_stats: bool = False


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: str
    content: str | list[ContentPart] | None = None
    name: str | None = None


class _SamplingFields(BaseModel):
    """Fields shared by both endpoints, including vLLM's widely used extensions."""

    model_config = ConfigDict(extra="ignore")
    model: str | None = None
    temperature: float | None = None
    top_p: float | None = None
    n: int = Field(1, ge=1, le=MAX_N)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    seed: int | None = None
    user: str | None = None
    logit_bias: dict[str, float] | None = None
    # extensions
    top_k: int | None = Field(None, ge=-1, le=MAX_TOKEN_ID)
    min_p: float | None = None
    repetition_penalty: float | None = None
    ignore_eos: bool = False
    min_tokens: int = 0
    stop_token_ids: list[Annotated[int, Field(ge=0, le=MAX_TOKEN_ID)]] | None = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    # structured outputs (vLLM): one of json / regex / choice / grammar / json_object; or the older guided_* fields
    structured_outputs: dict[str, Any] | None = None
    guided_json: Any = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    # Tokenize control-token text in user content as plain text (see README, security).
    split_special_tokens: bool = False

    def check_unsupported(self) -> None:
        if self.logit_bias:
            raise ValueError("logit_bias is not supported")
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed when stream is true")

    def sampling_params(self, max_tokens: int, logprobs: int | None) -> SamplingParams:
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            top_k=self.top_k or 0,
            min_p=self.min_p or 0.0,
            seed=self.seed,
            presence_penalty=self.presence_penalty or 0.0,
            frequency_penalty=self.frequency_penalty or 0.0,
            repetition_penalty=1.0 if self.repetition_penalty is None else self.repetition_penalty,
            stop=stop,
            stop_token_ids=tuple(self.stop_token_ids or ()),
            include_stop_str_in_output=self.include_stop_str_in_output,
            ignore_eos=self.ignore_eos,
            min_tokens=min(self.min_tokens, max_tokens),
            logprobs=logprobs,
            prompt_logprobs=self.requested_prompt_logprobs(),
            skip_special_tokens=self.skip_special_tokens,
        )

    def requested_prompt_logprobs(self) -> int | None:
        return None


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(..., min_length=1, max_length=MAX_MESSAGES)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    tools: list[dict[str, Any]] | None = None
    tool_choice: Any = None
    parallel_tool_calls: bool | None = None
    response_format: dict[str, Any] | None = None
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template_kwargs: dict[str, Any] | None = None
    chat_template: Any = None  # vLLM's field: refused, the model's own template is used

    def check_unsupported(self) -> None:
        super().check_unsupported()
        if self.chat_template is not None:
            raise ValueError("chat_template is not accepted: the server renders the model's own chat template")
        check_template_kwargs(self.chat_template_kwargs or {})
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs requires logprobs to be true")
        for i, msg in enumerate(self.messages):
            if msg.role not in VALID_ROLES:
                raise ValueError(f"messages[{i}].role must be one of {', '.join(VALID_ROLES)}; got {msg.role!r}")

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def requested_logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    def template_messages(self) -> list[dict]:
        out = []
        for msg in self.messages:
            d = msg.model_dump(exclude_none=True)
            d["role"] = "system" if msg.role == "developer" else msg.role
            if isinstance(msg.content, list):
                texts = []
                for part in msg.content:
                    if part.type != "text" or part.text is None:
                        raise ValueError(f"content part type {part.type!r} is not supported; only text")
                    texts.append(part.text)
                d["content"] = "\n".join(texts)  # as vLLM joins text parts
            elif msg.content is None:
                d["content"] = ""
            out.append(d)
        return out


class CompletionRequest(_SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(16, ge=1)
    logprobs: int | None = Field(None, ge=0, le=20)
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None

    def check_unsupported(self) -> None:
        super().check_unsupported()
        if self.suffix:
            raise ValueError("suffix is not supported")
        if self.best_of is not None and self.best_of != self.n:
            raise ValueError("best_of other than n is not supported")
        if self.echo and self.logprobs is not None:
            if self.stream:
                raise ValueError("echo with logprobs (prompt logprobs) is not supported with stream")

    def requested_prompt_logprobs(self) -> int | None:
        return self.logprobs if self.echo else None

    def prompts(self) -> list[str | list[int]]:
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if not p:
            raise ValueError("prompt must not be empty")
        if all(isinstance(x, int) for x in p):
            return [list(p)]
        return list(p)
