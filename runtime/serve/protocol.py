"""OpenAI's chat completions wire format: the request's checks, its mapping onto Sampling, the response and chunk
bodies, and the error shape `{"error": {"message", "type", "param", "code"}}` every refusal takes.

Rules (the README's Serve section says the same):
- the model id names the document; the last message must be the user's, and its text is the question; earlier
  turns and system or developer messages are ignored (the document's chat prefix is fixed inside it, and every
  question is answered fresh, as `nectar-export chat` does);
- content is a string or a list of text parts (joined); other part types are refused;
- temperature (0..2, default 1 as OpenAI's; 0 is greedy), top_p (0 < p <= 1), top_k (an extension, 0 = off),
  seed (>= 0; a random one when absent), max_completion_tokens or max_tokens (>= 1; the room left in the window
  when absent, and capped by it), stop (a string or up to 4), n (1 only), logprobs (false only), stream and
  stream_options.include_usage; other OpenAI fields are accepted and ignored.
"""

from __future__ import annotations

import json
import secrets
import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr, ValidationError

from nectar_runtime.sampling import Sampling
from nectar_runtime.serve.workers import Done

MAX_STOPS = 4
MAX_SEED = (1 << 63) - 1
TYPES = {400: "invalid_request_error", 404: "invalid_request_error", 405: "invalid_request_error",
         413: "invalid_request_error", 429: "rate_limit_error", 500: "server_error", 503: "service_unavailable",
         504: "timeout_error"}


class ApiError(Exception):
    """A refusal with its HTTP status and OpenAI-shaped body."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return error_body(self.message, TYPES.get(self.status, "invalid_request_error"), self.param, self.code)


def error_body(message: str, kind: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}



class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: StrictBool = False


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: Any = None                             # a string or a list of text parts: see question()


class ChatRequest(BaseModel):
    """The fields this server reads; unknown ones are ignored."""

    model_config = ConfigDict(extra="ignore")
    model: StrictStr
    messages: list[Message] = Field(min_length=1, max_length=4096)
    stream: StrictBool | None = False
    stream_options: StreamOptions | None = None
    temperature: float | None = Field(None, ge=0, le=2, strict=True, allow_inf_nan=False)
    top_p: float | None = Field(None, gt=0, le=1, strict=True, allow_inf_nan=False)
    top_k: StrictInt | None = Field(None, ge=0)
    max_tokens: StrictInt | None = Field(None, ge=1)
    max_completion_tokens: StrictInt | None = Field(None, ge=1)
    seed: StrictInt | None = Field(None, ge=0, le=MAX_SEED)
    stop: Any = None                                # a string or a list of up to 4: see stops()
    n: StrictInt | None = Field(None, ge=1)
    logprobs: StrictBool | None = None


def _reject_constant(name: str) -> float:
    raise ValueError(f"{name} is not JSON")


def parse_request(body: bytes) -> ChatRequest:
    """The request body as a ChatRequest; ApiError(400) for anything that is not one."""
    try:
        payload = json.loads(body.decode("utf-8"), parse_constant=_reject_constant)
    except UnicodeDecodeError as exc:
        raise ApiError(400, f"the request body is not UTF-8 (byte {exc.start})", code="invalid_json") from None
    except json.JSONDecodeError as exc:
        raise ApiError(400, f"the request body is not valid JSON: {exc.msg} at character {exc.pos}",
                       code="invalid_json") from None
    except (RecursionError, ValueError) as exc:   # nesting past the parser, 4,300+ digit integers, NaN
        raise ApiError(400, f"the request body is not valid JSON: {str(exc)[:200]}", code="invalid_json") from None
    if not isinstance(payload, dict):
        raise ApiError(400, f"the request body must be a JSON object, got {type(payload).__name__}",
                       code="invalid_json")
    try:
        return ChatRequest.model_validate(payload)
    except ValidationError as exc:
        raise validation_error(exc.errors(include_url=False)) from None


def param_path(loc: tuple[Any, ...]) -> str:
    """A pydantic location as OpenAI writes a param: messages[0].role."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def validation_error(errors: list[dict[str, Any]]) -> ApiError:
    """The first pydantic error as a 400 naming its param."""
    first = errors[0]
    loc = tuple(p for p in first.get("loc", ()) if p != "body")
    param = param_path(loc) or None
    shown = first.get("msg", "invalid value")
    return ApiError(400, f"{param}: {shown}" if param else shown, param=param, code="invalid_value")


def question(request: ChatRequest) -> str:
    """The last message's text, which must be the user's; ApiError(400) otherwise."""
    index = len(request.messages) - 1
    last = request.messages[index]
    if not any(m.role == "user" for m in request.messages):
        raise ApiError(400, "the request has no user message: send the question about the document as the last "
                            "message, with role user", param="messages")
    if last.role != "user":
        raise ApiError(400, f"the last message must be the user's question (role user), got role {last.role}; "
                            "earlier turns are ignored", param=f"messages[{index}].role")
    text = content_text(last.content, f"messages[{index}].content")
    if not text.strip():
        raise ApiError(400, "the user's message is empty: pass the question to ask about the document",
                       param=f"messages[{index}].content")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:               # lone surrogates from \ud800 escapes
        raise ApiError(400, f"the user's message is not valid UTF-8 (at character {exc.start})",
                       param=f"messages[{index}].content") from None
    return text


def content_text(content: Any, param: str) -> str:
    """A message's content as text: a string, or a list of {"type": "text", "text": ...} parts joined."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise ApiError(400, f"{param} must be a string or a list of text parts", param=param)
    texts = []
    for i, part in enumerate(content):
        if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
            kind = part.get("type") if isinstance(part, dict) else type(part).__name__
            raise ApiError(400, f"{param}[{i}] must be a text part ({{\"type\": \"text\", \"text\": ...}}), "
                                f"got {str(kind)[:40]}; this server answers text only", param=f"{param}[{i}]")
        texts.append(part["text"])
    return "\n".join(texts)


def stops(request: ChatRequest) -> tuple[str, ...]:
    """The stop strings: none, one string, or a list of up to 4 non-empty strings."""
    stop = request.stop
    if stop is None:
        return ()
    values = [stop] if isinstance(stop, str) else stop
    if not (isinstance(values, list) and all(isinstance(s, str) and s for s in values)):
        raise ApiError(400, "stop must be a non-empty string or a list of them", param="stop")
    if len(values) > MAX_STOPS:
        raise ApiError(400, f"stop takes at most {MAX_STOPS} strings, got {len(values)}", param="stop")
    return tuple(values)


def unsupported(request: ChatRequest) -> None:
    """ApiError(400) for what this server cannot do: several choices, log probabilities."""
    if request.n not in (None, 1):
        raise ApiError(400, f"n must be 1 (one answer per request), got {request.n}", param="n",
                       code="unsupported_value")
    if request.logprobs:
        raise ApiError(400, "logprobs are not supported by this server", param="logprobs", code="unsupported_value")


def sampling(request: ChatRequest, room: int) -> Sampling:
    """The request's Sampling; the answer is capped by `room`, what the prompt leaves of the window."""
    limit = request.max_completion_tokens or request.max_tokens or room
    seed = request.seed if request.seed is not None else secrets.randbelow(MAX_SEED)
    temperature = 1.0 if request.temperature is None else request.temperature
    return Sampling(max_new_tokens=min(limit, room), temperature=temperature, top_k=request.top_k or 0,
                    top_p=1.0 if request.top_p is None else request.top_p, seed=seed)


def completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


def usage(done: Done) -> dict[str, Any]:
    """OpenAI's usage, and the timings as extras."""
    extras = {"prefill_ms": round(done.prefill_ms, 3), "ms_per_token": round(done.ms_per_token, 3),
              "queue_ms": round(done.queue_ms, 3)}
    if done.switch_ms:
        extras["pack_switch_ms"] = round(done.switch_ms, 3)
    return {"prompt_tokens": done.prompt_tokens, "completion_tokens": done.completion_tokens,
            "total_tokens": done.prompt_tokens + done.completion_tokens, **extras}


def finish_reason(done: Done) -> str:
    return "stop" if done.finish == "stop" else "length"


def completion(cid: str, model: str, text: str, done: Done) -> dict[str, Any]:
    """The chat.completion object of a whole answer."""
    return {"id": cid, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                         "finish_reason": finish_reason(done)}],
            "usage": usage(done)}


def chunk(cid: str, model: str, delta: dict[str, Any], finish: str | None = None,
          usage_: dict[str, Any] | None = None, choices: bool = True) -> dict[str, Any]:
    """One chat.completion.chunk; the usage chunk (stream_options.include_usage) has no choices."""
    body: dict[str, Any] = {"id": cid, "object": "chat.completion.chunk", "created": int(time.time()),
                            "model": model,
                            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]
                            if choices else []}
    if usage_ is not None:
        body["usage"] = usage_
    return body


def sse(data: dict[str, Any] | str) -> bytes:
    """One server-sent event: `data: JSON` and a blank line."""
    text = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)
    return f"data: {text}\n\n".encode()
