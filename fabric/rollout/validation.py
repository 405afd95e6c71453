"""Checks a GenerateRequest and resolves it into prompt token ids plus Sampling, or raises a FabricError
(INVALID_ARGUMENT) whose message names the field and the fix. The same rules check generating_args at start."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from fabric.errors import FabricError, invalid
from fabric.rollout.engine import Sampling
from fabric.v1 import rollout_pb2

# More samples than this for one prompt is almost surely a mistake (and would flood the engine).
MAX_RETURN_SEQUENCES = 1024
SAMPLING_FIELDS = tuple(f.name for f in rollout_pb2.SamplingParams.DESCRIPTOR.fields)


def sampling_overrides(sampling: rollout_pb2.SamplingParams) -> dict[str, Any]:
    """The fields a request set explicitly (proto3 optional presence), as a dict."""
    out: dict[str, Any] = {}
    for name in SAMPLING_FIELDS:
        if name == "stop":
            if sampling.stop:
                out["stop"] = list(sampling.stop)
        elif sampling.HasField(name):
            out[name] = getattr(sampling, name)
    return out


def resolve_sampling(values: dict[str, Any], field_prefix: str = "sampling") -> Sampling:
    """generating_args defaults merged with a request's overrides -> checked Sampling. max_new_tokens may be
    None here (unset everywhere): the caller fills the context."""

    def field(name: str) -> str:
        return f"{field_prefix}.{name}"

    def number(name: str, default: float) -> float:
        value = values.get(name, default)
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise invalid(field(name), f"expected a finite number, got {value!r}")
        return float(value)

    def integer(name: str, default: int | None) -> int | None:
        value = values.get(name, default)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int):
            raise invalid(field(name), f"expected an integer, got {value!r}")
        return value

    temperature = number("temperature", 1.0)
    if not 0 <= temperature <= 2:  # vLLM's range: past it the engine refuses the request
        raise invalid(field("temperature"), f"must be in [0, 2] (0 is greedy), got {temperature:g}")
    top_p = number("top_p", 1.0)
    if not 0 < top_p <= 1:
        raise invalid(field("top_p"), f"must be in (0, 1], got {top_p:g}")
    top_k = integer("top_k", 0) or 0
    if top_k < -1:
        raise invalid(field("top_k"), f"must be >= 1, or 0 / -1 for no top-k, got {top_k}")
    num_beams = integer("num_beams", 1)
    assert num_beams is not None
    if num_beams < 0:
        raise invalid(field("num_beams"), f"must be 1, got {num_beams}")
    if num_beams > 1:
        raise invalid(
            field("num_beams"),
            f"beam search is not supported by the vLLM backend (vLLM dropped it from SamplingParams); "
            f"set num_beams to 1 and sample with num_return_sequences instead (got {num_beams})",
            reason="BEAM_SEARCH_UNSUPPORTED",
        )
    n = integer("num_return_sequences", 1)
    assert n is not None
    if not 1 <= n <= MAX_RETURN_SEQUENCES:
        raise invalid(field("num_return_sequences"), f"must be in [1, {MAX_RETURN_SEQUENCES}], got {n}")
    max_new_tokens = integer("max_new_tokens", None)
    if max_new_tokens is not None and max_new_tokens < 1:
        raise invalid(field("max_new_tokens"), f"must be >= 1, got {max_new_tokens}")
    repetition_penalty = number("repetition_penalty", 1.0)
    if repetition_penalty <= 0:
        raise invalid(field("repetition_penalty"), f"must be > 0 (1 is off), got {repetition_penalty:g}")
    stop = values.get("stop") or []
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
        raise invalid(field("stop"), f"expected a list of non-empty strings, got {stop!r}")
    logprobs = values.get("logprobs", True)
    if not isinstance(logprobs, bool):
        raise invalid(field("logprobs"), f"expected true or false, got {logprobs!r}")
    return Sampling(
        max_new_tokens=max_new_tokens,  # type: ignore[arg-type]  # None until the caller fills the context
        temperature=temperature,
        top_p=top_p,
        top_k=0 if top_k == -1 else top_k,
        num_return_sequences=n,
        seed=integer("seed", None),
        logprobs=logprobs,
        stop=stop,
        repetition_penalty=repetition_penalty,
    )


def resolve_prompt(
    request: rollout_pb2.GenerateRequest, tokenize: Callable[[str], list[int]], vocab_size: int, max_model_len: int
) -> list[int]:
    """Exactly one of prompt / prompt_token_ids, ids inside the vocabulary, room for at least one new token."""
    if request.prompt and request.prompt_token_ids:
        raise invalid("prompt", "set exactly one of prompt and prompt_token_ids, not both", reason="PROMPT_AMBIGUOUS")
    if request.prompt:
        ids, field = tokenize(request.prompt), "prompt"
        if not ids:
            raise invalid("prompt", "tokenizes to no tokens: send some text", reason="PROMPT_EMPTY")
    elif request.prompt_token_ids:
        ids, field = list(request.prompt_token_ids), "prompt_token_ids"
        for position, token in enumerate(ids):
            if not 0 <= token < vocab_size:
                raise invalid(
                    f"prompt_token_ids[{position}]",
                    f"token id {token} is outside the vocabulary [0, {vocab_size})",
                    reason="TOKEN_OUT_OF_VOCABULARY",
                )
    else:
        raise invalid("prompt", "empty: set prompt (text) or prompt_token_ids", reason="PROMPT_EMPTY")
    if len(ids) >= max_model_len:
        raise invalid(
            field,
            f"{len(ids)} tokens is too long: max_model_len is {max_model_len}, so a prompt may have at most "
            f"{max_model_len - 1} tokens (shorten it, or raise strategy_config.max_model_len)",
            reason="PROMPT_TOO_LONG",
        )
    return ids


def resolve_request(
    request: rollout_pb2.GenerateRequest,
    defaults: dict[str, Any],
    tokenize: Callable[[str], list[int]],
    vocab_size: int,
    max_model_len: int,
) -> tuple[list[int], Sampling]:
    """A whole request: prompt ids and Sampling with max_new_tokens set and fitting the context."""
    if not request.request_id:
        raise invalid("request_id", "empty: give every request an id (it is echoed on its responses)")
    overrides = sampling_overrides(request.sampling)
    sampling = resolve_sampling({**defaults, **overrides})
    prompt_ids = resolve_prompt(request, tokenize, vocab_size, max_model_len)
    room = max_model_len - len(prompt_ids)
    if sampling.max_new_tokens is None:
        sampling.max_new_tokens = room  # unset everywhere: fill the context, as vLLM's OpenAI server does
    elif sampling.max_new_tokens > room:
        source = "" if "max_new_tokens" in overrides else " (the generating_args default)"
        raise invalid(
            "sampling.max_new_tokens",
            f"{sampling.max_new_tokens}{source} is too large: the prompt has {len(prompt_ids)} tokens and "
            f"max_model_len is {max_model_len}, so at most {room} new tokens fit",
            reason="MAX_NEW_TOKENS_TOO_LARGE",
        )
    return prompt_ids, sampling


def check_generating_args(defaults: dict[str, Any], role: str) -> None:
    """generating_args meet the same rules as a request's sampling; a ConfigError names the key otherwise."""
    from fabric.config.loader import ConfigError

    try:
        resolve_sampling(defaults, field_prefix="generating_args")
    except FabricError as err:
        raise ConfigError(f"{role}.{err.field}", err.message.split(": ", 1)[1]) from None
