"""`llm_judge`: ROLL's LLMJudgeRewardWorker, asking a fabric rollout server whether each response is right.

ROLL serves the judge model inside its worker; here any `fabric serve rollout` server serving it does, over the
same gRPC API the trainer uses (fabric.rollout.client). A batch goes out as one Generate stream per server (items
spread round robin over `judge_address`). As in ROLL: the question is the prompt's last user turn (the text after
its last "user\\n"), the judge prompt is `judge_prompt` with {question}, {response} and {reference} (the ground
truth) filled in, sent as one user message through the judge model's chat template, and the reward is 1.0 when
the judge's reply contains "yes" (any case), else 0.0 (ROLL's _extract_score_v2); the correctness score is the same.

Config keys: `judge_address` (host:port, or a list, of rollout servers serving the judge model; required;
`actor_infer`: the run's own rollout servers, which `fabric run` fills in),
`judge_prompt` (ROLL's prompt name `Qwen2.5-7B-Instruct-RLVR-prompt`, or a template of your own with the three
fields; required: ROLL's fallback prompt asks for a 0-10 score that its parser then reads as yes/no),
`judge_model_type` (`inference` only: ROLL's `api` calls an OpenAI-style endpoint, which the fabric does not),
`generating_args` (max_new_tokens, temperature, top_p, top_k, as ROLL's), `model_args.model_name_or_path` (the
judge's tokenizer, for its chat template; without it the prompt is sent as plain text), `timeout_s` (per batch, 120).
"""

from __future__ import annotations

import asyncio
import itertools

import grpc

from fabric.config import ConfigError
from fabric.errors import FabricError, unavailable
from fabric.reward.scorer import ScoreItem, Scorer, ScoreResult
from fabric.rollout.client import GenerateRequest, RolloutClient, SamplingParams

# ROLL's roll/utils/prompt.py prompt_maps, word for word.
QWEN2_5_7B_INSTRUCT_RLVR_PROMPT = """
Given a problem, determine whether the final answer in the provided (incomplete) solution process matches the reference answer.  
The reference answer may be one single option character (e.g., A, B, C, D), a numerical value, an expression, or a list of answers if multiple questions are involved.  
**The reference answer may be in Chinese or another language, but your evaluation should be language-agnostic.**  

Your task:  
- Compare the final output of the solution process with the reference answer.  
- If they **match exactly**, output **YES**.  
- If they **do not match**, output **NO**.  
- If the solution process is unclear, incomplete, or ambiguous, assume it is incorrect and output **NO**.  

Your output must be strictly **'YES'** or **'NO'**, with no additional words, punctuation, or explanation.  

---

**Question:**  
{question}  

**Solution Process (Final Step Only):**  
{response}  

**Reference Answer:**  
{reference}  

**Output:**  
"""  # noqa: E501, W291 - ROLL's prompt, its long lines and trailing spaces kept
PROMPTS = {"Qwen2.5-7B-Instruct-RLVR-prompt": QWEN2_5_7B_INSTRUCT_RLVR_PROMPT}
SAMPLING_KEYS = ("max_new_tokens", "temperature", "top_p", "top_k")
# judge_address meaning "the run's own rollout servers": `fabric run` replaces it with their addresses (a demo's
# shortcut: the policy judges itself; a real judge is another model behind its own `fabric serve rollout`).
JUDGE_ON_ACTOR_INFER = "actor_infer"


def judge_verdict(reply: str) -> float:
    """ROLL's _extract_score_v2: 1.0 when the reply says yes anywhere, else 0.0 (no, or neither)."""
    return 1.0 if "yes" in reply.lower() else 0.0


class LLMJudgeScorer(Scorer):
    """ROLL's LLMJudgeRewardWorker over fabric rollout servers (see the module doc)."""

    needs_ground_truth = True

    def __init__(self, config):
        super().__init__(config)
        addresses = config.options.get("judge_address")
        addresses = [addresses] if isinstance(addresses, str) else addresses
        if not addresses or not all(isinstance(a, str) and a for a in addresses):
            raise ConfigError(
                config.key("judge_address"),
                "missing: the host:port (or a list) of fabric rollout servers serving the judge model",
            )
        self.addresses: list[str] = list(addresses)
        kind = config.options.get("judge_model_type", "inference")
        if kind != "inference":
            raise ConfigError(
                config.key("judge_model_type"),
                f"{kind!r}: only inference (a fabric rollout server at judge_address); API judges are not supported",
            )
        name = config.get_str("judge_prompt", "")
        self.template = PROMPTS.get(name, name)
        try:
            self.template.format(question="q", response="r", reference="a")
        except (KeyError, IndexError, ValueError) as exc:
            raise ConfigError(config.key("judge_prompt"), f"bad template ({exc!r}): use {{question}}, {{response}} "
                              "and {reference} only (double other braces)") from None  # fmt: skip
        if not all(f"{{{field}}}" in self.template for field in ("question", "response", "reference")):
            raise ConfigError(
                config.key("judge_prompt"),
                f"{name[:60]!r}: name one of {', '.join(PROMPTS)} or write a template with {{question}}, "
                "{response} and {reference}",
            )
        generating = config.options.get("generating_args") or {}
        if not isinstance(generating, dict):
            raise ConfigError(config.key("generating_args"), "expected a mapping")
        for key in ("num_beams", "num_return_sequences"):
            if generating.get(key, 1) != 1:
                raise ConfigError(config.key(f"generating_args.{key}"), "must be 1: the judge answers once per item")
        try:
            self.sampling = SamplingParams(
                **{key: generating[key] for key in SAMPLING_KEYS if generating.get(key) is not None},
                num_return_sequences=1,
                logprobs=False,
            )
        except (TypeError, ValueError) as exc:
            raise ConfigError(config.key("generating_args"), f"{exc}") from None
        self.timeout_s = config.get_float("timeout_s", 120.0, minimum=0.1)
        self.model = f"LLM judge at {', '.join(self.addresses)}"
        self.device = "remote"
        self._tokenizer = None
        self._clients: list[RolloutClient] = []

    async def start(self) -> None:
        if JUDGE_ON_ACTOR_INFER in self.addresses:
            raise ConfigError(
                self.config.key("judge_address"),
                f"{JUDGE_ON_ACTOR_INFER} names the run's own rollout servers, which only `fabric run` knows; "
                "give host:port of a rollout server serving the judge model",
            )
        if self.config.model_name_or_path:
            from transformers import AutoTokenizer

            try:
                tokenizer = AutoTokenizer.from_pretrained(self.config.model_name_or_path)
            except (OSError, ValueError) as exc:
                raise ConfigError(
                    self.config.key("model_args.model_name_or_path"), f"cannot load the judge's tokenizer: {exc}"
                ) from None
            self._tokenizer = tokenizer if tokenizer.chat_template else None
        self._clients = [RolloutClient(address, timeout=self.timeout_s) for address in self.addresses]

    async def close(self) -> None:
        await asyncio.gather(*(client.close() for client in self._clients))
        self._clients = []

    def judge_prompt(self, item: ScoreItem) -> str:
        """The text sent to the judge: ROLL's question extraction, template and chat formatting."""
        question = item.prompt.split("user\n")[-1].strip() if "user\n" in item.prompt else item.prompt
        content = self.template.format(question=question, response=item.response, reference=item.ground_truth)
        if self._tokenizer is None:
            return content
        messages = [{"role": "user", "content": content}]
        return self._tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    async def _ask(self, client: RolloutClient, items: list[tuple[int, ScoreItem]], out: list) -> None:
        requests = [
            GenerateRequest(request_id=str(index), prompt=self.judge_prompt(item), sampling=self.sampling)
            for index, item in items
        ]
        try:
            async for response in client.generate(requests, timeout=self.timeout_s):
                index = int(response.request_id)
                if response.HasField("error"):  # passed on with its status, so a transient refusal is retried
                    code = next((c for c in grpc.StatusCode if c.value[0] == response.error.code), None)
                    message = f"the judge at {client.address} refused the item: {response.error.message}"
                    out[index] = FabricError(code or grpc.StatusCode.INTERNAL, message, response.error.reason)
                    continue
                verdict = judge_verdict(response.text)
                out[index] = ScoreResult(verdict, f"judge: {response.text.strip()[:200]}", correct=verdict)
        except grpc.RpcError as err:
            for index, _ in items:
                if out[index] is None:
                    out[index] = unavailable(f"judge at {client.address}: {err.code().name}: {err.details()}")
        for index, _ in items:
            if out[index] is None:
                out[index] = unavailable(f"judge at {client.address} ended the stream without answering")

    async def score_batch(self, items: list[ScoreItem]) -> list[ScoreResult | BaseException]:
        if not self._clients:
            return [RuntimeError(f"{self.name}: not started, or closed")] * len(items)
        out: list[ScoreResult | BaseException | None] = [None] * len(items)
        shares: dict[int, list[tuple[int, ScoreItem]]] = {}
        for (index, item), slot in zip(enumerate(items), itertools.cycle(range(len(self._clients))), strict=False):
            shares.setdefault(slot, []).append((index, item))
        await asyncio.gather(*(self._ask(self._clients[slot], share, out) for slot, share in shares.items()))
        return [result if result is not None else RuntimeError("unanswered") for result in out]
