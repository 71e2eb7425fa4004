"""The OpenAI request bodies Alloy accepts, as pydantic models (FastAPI validates and documents them).

Fields Alloy does not implement are accepted only at their neutral value, so a client that relies
on them hears so instead of getting silently different output.
"""

from __future__ import annotations

from typing import Literal, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator

MAX_TOKENS_LIMIT = 1 << 20  # far past any context; a bigger value is a client bug


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str = Field(min_length=1, max_length=256)
    max_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS_LIMIT)
    temperature: float | None = Field(None, ge=0.0, le=2.0)  # None: the model's generation_config, else 1.0
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    n: Literal[1] = 1
    stream: bool = False
    stop: Union[str, list[str], None] = Field(None, validate_default=True)
    seed: int | None = Field(None, ge=0, lt=1 << 63)
    presence_penalty: Literal[0, 0.0] = 0.0
    frequency_penalty: Literal[0, 0.0] = 0.0
    logit_bias: dict[str, Literal[0, 0.0]] | None = None
    # Beyond OpenAI, as llama.cpp's server and vLLM take them (repeat_penalty: llama.cpp's name)
    top_k: int | None = Field(None, ge=0, le=1 << 20)
    min_p: float | None = Field(None, ge=0.0, lt=1.0)
    repetition_penalty: float | None = Field(None, gt=0.0, le=10.0)
    repeat_penalty: float | None = Field(None, gt=0.0, le=10.0)
    stream_options: dict | None = None
    user: str | None = None

    @field_validator("stop")
    @classmethod
    def _stops(cls, value):
        stops = [value] if isinstance(value, str) else list(value or [])
        if len(stops) > 4 or any(not s for s in stops):
            raise ValueError("stop takes at most 4 non-empty strings")
        return stops

    @property
    def include_usage(self) -> bool:
        return bool((self.stream_options or {}).get("include_usage"))


class CompletionRequest(_Body):
    prompt: Union[str, list[str], list[int]]
    max_tokens: int | None = Field(16, ge=1, le=MAX_TOKENS_LIMIT)  # OpenAI's default for completions
    logprobs: int | None = Field(None, ge=0, le=20)
    echo: Literal[False] = False

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, value):
        if not value:
            raise ValueError("the prompt is empty")
        if isinstance(value, list) and isinstance(value[0], str):
            if len(value) != 1:
                raise ValueError("one prompt per request (a list of several prompts is not supported)")
            return value[0]
        return value


class ContentPart(BaseModel):
    type: Literal["text"]
    text: str


class Message(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Union[str, list[ContentPart], None] = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class ChatRequest(_Body):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS_LIMIT)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)


class EmbeddingRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str = Field(min_length=1, max_length=256)
    input: Union[str, list[str], list[int], list[list[int]]]

    @field_validator("input")
    @classmethod
    def _inputs(cls, value):
        if not value or (isinstance(value, list) and len(value) > 2048):
            raise ValueError("input takes 1 to 2048 items")
        if isinstance(value, str) or isinstance(value[0], int):
            value = [value]
        if any(not item for item in value):
            raise ValueError("an input is empty")
        return value
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = None
    user: str | None = None
