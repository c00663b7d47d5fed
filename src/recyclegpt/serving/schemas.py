"""The request bodies of the OpenAI-compatible endpoints, as pydantic models.

Fields the server does not implement are declared so that a request using them is refused with a clear 400
(`unsupported_fields`) rather than silently ignored; fields it does not know at all are ignored, as OpenAI's
clients send a few optional ones (user, metadata, ...) that do not change the output.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class RecycleOptions(BaseModel):
    """The `recyclegpt` extension object of a request."""

    model_config = ConfigDict(extra="forbid")
    strategy: str | None = None
    ignore_eos: bool = False  # decode to max_tokens past end-of-sequence tokens (as vLLM's ignore_eos; benchmarks)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False


class _Common(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None  # an extension (OpenAI has no top_k)
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    recyclegpt: RecycleOptions | None = None
    # completions: an int (the alternatives per token, 0-5); chat: a bool, with top_logprobs (0-20) alternatives
    logprobs: Any = None
    top_logprobs: int | None = None
    # declared only to be refused when set to anything but their neutral value
    n: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None

    def unsupported(self) -> list[str]:
        """The fields set to something this server does not implement."""
        bad = []
        if self.n not in (None, 1):
            bad.append("n")
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name) not in (None, 0, 0.0):
                bad.append(name)
        if self.logit_bias:
            bad.append("logit_bias")
        return bad


class CompletionRequest(_Common):
    prompt: str | list[int] | list[str] | list[list[int]] = Field(...)
    max_tokens: int | None = None
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None

    def unsupported(self) -> list[str]:
        bad = super().unsupported()
        if self.echo:
            bad.append("echo")
        if self.suffix:
            bad.append("suffix")
        if self.best_of not in (None, 1):
            bad.append("best_of")
        return bad


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[dict[str, Any]] | None = None

    def text(self) -> str:
        """The message's text: a string, or the text parts of a list of content parts joined."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        parts = []
        for p in self.content:
            if p.get("type") != "text" or not isinstance(p.get("text"), str):
                raise ValueError(f"only text content parts are supported, got type {p.get('type')!r}")
            parts.append(p["text"])
        return "".join(parts)


class ChatCompletionRequest(_Common):
    messages: list[ChatMessage] = Field(..., min_length=1)
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    tools: list[Any] | None = None
    response_format: dict[str, Any] | None = None

    def unsupported(self) -> list[str]:
        bad = super().unsupported()
        if self.tools:
            bad.append("tools")
        if self.response_format and self.response_format.get("type") not in (None, "text"):
            bad.append("response_format")
        return bad
