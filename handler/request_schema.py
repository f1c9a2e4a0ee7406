"""The request body of the Mixtral handler: parse it, check every field, say exactly what is wrong.

Kept apart from the handler so the rules read in one place and are tested without TorchServe.
A body is a JSON object:

    {"prompt": "...", "max_new_tokens": 50, "temperature": 0.0, "top_k": null, "top_p": null,
     "seed": null, "stop": ["\\n\\n"], "stream": false}

Only `prompt` is required. Anything else, a wrong type or a value out of range is a `RequestError`,
which the handler answers with HTTP 400 and a message that names the field.
"""

from __future__ import annotations

import difflib
import json
import math
import reprlib
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from gpt_fast_mixtral.generate import SEED_LIMIT, SamplingParams

FIELDS = ("prompt", "max_new_tokens", "temperature", "top_k", "top_p", "seed", "stop", "stream")
MAX_STOP_STRINGS = 16
MAX_STOP_CHARS = 256


@dataclass(frozen=True)
class _LongInteger:
    """A JSON integer with more digits than Python converts (sys.get_int_max_str_digits(), 4300 by
    default): kept as its length, so that the field it came in is the one named in the error."""

    digits: int

    def __repr__(self) -> str:
        return f"an integer of {self.digits} digits"


def _parse_int(text: str) -> int | _LongInteger:
    try:
        return int(text)
    except ValueError:
        return _LongInteger(len(text.lstrip("-")))


class RequestError(ValueError):
    """A request that cannot be served as sent; `field` names the part to fix (None: the whole body)."""

    def __init__(self, field: str | None, message: str) -> None:
        super().__init__(message)
        self.field = field
        self.message = message


@dataclass(frozen=True)
class GenerationRequest:
    prompt: str
    params: SamplingParams
    stream: bool
    # Whether the client chose max_new_tokens: a default may shrink to fit the context, a choice may not.
    explicit_max_new_tokens: bool


def body_part(parts: dict[str, Any]) -> str:
    """Which part of a request as TorchServe hands it over holds the JSON body: `body` (the HTTP body)
    or `data` (a multipart form field, as TorchServe's examples name it). Other form fields are not
    read: they are refused rather than ignored, so that e.g. a field stream=true does not go unheeded.
    (TorchServe drops query parameters before the handler: ?stream=true cannot be seen here.)"""
    name = next((key for key in ("body", "data") if key in parts), None)
    others = [str(key) for key in parts if key != name]
    if name is None:
        # What TorchServe passes for a form-encoded body, e.g. `curl -d` without a content type.
        got = f" (only the form fields {', '.join(map(_quote, others[:4]))})" if others else ""
        raise RequestError(None, f"no request body arrived{got}: send JSON with the header Content-Type: "
                                 "application/json, upload a file with curl -T request.json, or send a "
                                 "form field named data")
    if others:
        raise RequestError(others[0], f"the form field {_quote(others[0])} is not read: send every field in "
                                      'the JSON body, e.g. {"prompt": "Hi", "stream": true}')
    return name


def decode_body(body: object, *, parsed: bool = False) -> dict[str, Any]:
    """Turn what TorchServe hands over (the parsed JSON value for application/json, str for text/*,
    bytes otherwise) into the JSON object of the request. `parsed`: TorchServe has parsed the body
    already, so a str is a JSON string (e.g. an object encoded twice), not JSON text to parse."""
    if parsed and isinstance(body, str):
        hint = ("; it holds JSON encoded a second time: send the object itself"
                if body.lstrip().startswith("{") else "")
        raise RequestError(None, f'the request body must be a JSON object such as {{"prompt": "Hi"}}, '
                                 f"not a JSON string{hint}")
    if isinstance(body, (bytes, bytearray)):
        try:
            body = bytes(body).decode("utf-8")
        except UnicodeDecodeError as error:
            raise RequestError(None, f"the request body is not UTF-8 text: {error}") from None
    if isinstance(body, str):
        body = body.removeprefix("\ufeff")  # a UTF-8 byte order mark, which RFC 8259 lets a parser skip
        if not body.strip():
            raise RequestError(None, 'the request body is empty; send a JSON object such as {"prompt": "Hi"}')
        try:
            body = json.loads(body, parse_int=_parse_int)
        except json.JSONDecodeError as error:
            raise RequestError(None, f"the request body is not valid JSON: {error}") from None
        except RecursionError:
            raise RequestError(None, 'the request body is nested too deeply to read; send a flat JSON object '
                                     'such as {"prompt": "Hi", "stop": ["\\n"]}') from None
    if not isinstance(body, dict):
        raise RequestError(None, f'the request body must be a JSON object such as {{"prompt": "Hi"}}, '
                                 f"not a JSON {_json_type(body)}")
    return body


def parse_request(body: object, *, default_max_new_tokens: int, default_stream: bool,
                  max_seq_len: int, parsed: bool = False) -> GenerationRequest:
    """Validate one request body; raise RequestError naming the first bad field. `parsed`: see
    decode_body."""
    fields = decode_body(body, parsed=parsed)
    unknown = sorted(set(fields) - set(FIELDS))
    if unknown:
        raise RequestError(unknown[0], f"unknown field {_quote(unknown[0])}{_hint(unknown[0])}; the allowed "
                                       f"fields are {', '.join(FIELDS)}")

    if "prompt" not in fields:
        raise RequestError("prompt", "prompt is required: send a non-empty string")
    prompt = fields["prompt"]
    if not isinstance(prompt, str):
        raise RequestError("prompt", f"prompt must be a string, not {_json_type(prompt)}")
    if not prompt:
        raise RequestError("prompt", "prompt must not be empty")
    _check_unicode("prompt", prompt)

    # The prompt holds at least the BOS token, so at most max_seq_len - 1 tokens can be generated.
    token_limit = max_seq_len - 1
    max_new_tokens = _optional_int(fields, "max_new_tokens", 1, token_limit)
    temperature = _optional_number(fields, "temperature")
    if temperature is not None and temperature < 0:
        raise RequestError("temperature", f"temperature must be >= 0 (0 means greedy), got {temperature}")
    # 0 (transformers) and -1 (vLLM) mean no limit, as null does.
    top_k = _optional_int(fields, "top_k", -1, None, span=">= 1, or 0 or -1 for no limit")
    top_p = _optional_number(fields, "top_p")
    if top_p is not None and not 0 < top_p <= 1:
        raise RequestError("top_p", f"top_p must be in (0, 1], got {top_p}")
    seed = _optional_int(fields, "seed", 0, SEED_LIMIT - 1)
    stop = _stop_strings(fields.get("stop"))
    stream = fields.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise RequestError("stream", f"stream must be true or false, not {_json_type(stream)}")

    params = SamplingParams(
        max_new_tokens=min(default_max_new_tokens, token_limit) if max_new_tokens is None else max_new_tokens,
        temperature=0.0 if temperature is None else float(temperature),
        top_k=top_k,
        top_p=None if top_p is None else float(top_p),
        seed=seed,
        stop=stop,
    )
    return GenerationRequest(prompt, params, default_stream if stream is None else stream,
                             explicit_max_new_tokens=max_new_tokens is not None)


def fit_to_context(request: GenerationRequest, prompt_tokens: int, max_seq_len: int) -> SamplingParams:
    """The request's settings for a prompt of `prompt_tokens` tokens in a context of `max_seq_len`.

    A prompt that leaves no room is rejected; so is an explicit max_new_tokens that does not fit. A
    default max_new_tokens shrinks to the room left, so a long prompt without settings still works.
    """
    room = max_seq_len - prompt_tokens
    if room < 1:
        raise RequestError("prompt", f"the prompt is {prompt_tokens} tokens long but the context holds "
                                     f"{max_seq_len} tokens, the answer included; shorten the prompt")
    params = request.params
    if params.max_new_tokens <= room:
        return params
    if request.explicit_max_new_tokens:
        raise RequestError("max_new_tokens", f"the prompt is {prompt_tokens} tokens and max_new_tokens is "
                                             f"{params.max_new_tokens}: together they exceed the context of "
                                             f"{max_seq_len} tokens; set max_new_tokens to at most {room}")
    return SamplingParams(room, params.temperature, params.top_k, params.top_p, params.seed, params.stop)


_SHORT = reprlib.Repr()  # quotes a client's value in a message (and the log) without its megabytes
_SHORT.maxstring = _SHORT.maxlong = _SHORT.maxother = 60


# What other servers' clients send where we expect one of FIELDS (OpenAI's API and vLLM, Hugging Face TGI,
# transformers' generate()), and what to send instead.
_OTHER_NAMES = {
    "max_tokens": '"max_new_tokens"', "max_length": '"max_new_tokens"', "max_completion_tokens": '"max_new_tokens"',
    "inputs": '"prompt"', "input": '"prompt"', "text": '"prompt"', "messages": '"prompt" (a string)',
    "stop_sequences": '"stop"', "random_seed": '"seed"', "temp": '"temperature"',
    "do_sample": '"temperature" (above 0 samples, 0 is greedy)',
}


def _hint(name: str) -> str:
    """'; did you mean ...' for a field name close to one of ours or used by another server, else ''."""
    if name == "parameters":  # TGI nests the settings: {"inputs": ..., "parameters": {...}}
        return '; put the settings at the top level, e.g. {"prompt": "Hi", "max_new_tokens": 50}'
    if len(name) > 64:
        return ""
    folded = name.strip().lower().replace("-", "_").replace(" ", "_")
    if folded in FIELDS:
        return f'; did you mean "{folded}"?'
    if folded in _OTHER_NAMES:
        return f"; did you mean {_OTHER_NAMES[folded]}?"
    close = difflib.get_close_matches(folded, FIELDS, n=1, cutoff=0.75)
    return f'; did you mean "{close[0]}"?' if close else ""


def _quote(value: object) -> str:
    text = _SHORT.repr(value)
    if isinstance(value, str) and len(value) > _SHORT.maxstring:
        text += f" ({len(value)} characters)"
    return text


def _json_type(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float, _LongInteger)):
        return "number"
    return {str: "string", list: "array", dict: "object"}.get(type(value), type(value).__name__)


def _optional_int(fields: dict[str, Any], name: str, low: int, high: int | None,
                  span: str | None = None) -> int | None:
    """The integer field `name` in [low, high] (no upper bound when high is None), or None when absent;
    `span` says which values are allowed where "from low to high" would not say it all."""
    value = fields.get(name)
    if value is None:
        return None
    # JSON has one number type: 5.0 is accepted as 5, but 5.5 and true (a Python int) are not.
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if span is None:
        span = f"from {low} to {high}" if high is not None else f">= {low}"
    if isinstance(value, _LongInteger):
        limit = "" if high is not None else f" of at most {sys.get_int_max_str_digits()} digits"
        raise RequestError(name, f"{name} must be an integer {span}{limit}, got {value!r}")
    if isinstance(value, bool) or not isinstance(value, int):
        raise RequestError(name, f"{name} must be an integer {span}, not {_json_type(value)} {_quote(value)}")
    if value < low or (high is not None and value > high):
        raise RequestError(name, f"{name} must be an integer {span}, got {_quote(value)}")
    return value


def _optional_number(fields: dict[str, Any], name: str) -> float | None:
    value = fields.get(name)
    if value is None:
        return None
    if isinstance(value, _LongInteger):
        raise RequestError(name, f"{name} must be a finite number, got {value!r}")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise RequestError(name, f"{name} must be a number, not {_json_type(value)} {_quote(value)}")
    try:
        number = float(value)
    except OverflowError:  # an integer past the largest float (about 1.8e308)
        raise RequestError(name, f"{name} must be a finite number, got an integer of {len(str(abs(value)))} "
                                 "digits") from None
    if not math.isfinite(number):  # Python's json accepts NaN and Infinity
        raise RequestError(name, f"{name} must be a finite number, got {number}")
    return number


def _stop_strings(value: object) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, Sequence) or isinstance(value, str):
        raise RequestError("stop", f"stop must be an array of strings, not {_json_type(value)}")
    if len(value) > MAX_STOP_STRINGS:
        raise RequestError("stop", f"stop takes at most {MAX_STOP_STRINGS} strings, got {len(value)}")
    for item in value:
        if not isinstance(item, str) or not item or len(item) > MAX_STOP_CHARS:
            raise RequestError("stop", f"each stop string must be a non-empty string of at most "
                                       f"{MAX_STOP_CHARS} characters, got {_quote(item)}")
        _check_unicode("stop", item)
    return tuple(value)


def _check_unicode(name: str, text: str) -> None:
    # JSON can escape lone surrogates ("\ud800"), which are not text: the tokenizer cannot take them.
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        bad = text[error.start:error.end]
        raise RequestError(name, f"{name} is not valid Unicode text: it contains the lone surrogate "
                                 f"{bad!r} at character {error.start}") from None
