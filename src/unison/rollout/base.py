"""What every rollout engine takes and returns.

Log-prob semantics (the same for every engine, and what the learner recomputes):
    the log-prob reported for a sampled token y_t is log q(y_t | y_<t), where q is the distribution the engine
    actually sampled from: logits upcast to fp32, divided by the temperature, then restricted to the top-k tokens
    and to the smallest set of tokens whose probability reaches top-p (ties at the boundary kept), and renormalised
    over that support. With temperature 1, top_k 0 and top_p 1 (the paper's setting) q is the plain softmax.
    `unison.sampling.logprobs_of` computes the same q from full-sequence logits, so the learner's log pi refers to
    the same distribution as the sampler's log mu. The support is chosen from each engine's own logits, so a token
    at the top-p boundary can be inside the support for one engine and outside for the other; the trainer uses the
    untruncated distribution (q with top_k 0, top_p 1) unless asked otherwise, which is why the paper samples with
    top-p 1.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch


@dataclass(frozen=True)
class SamplingParams:
    """How to sample. `max_new_tokens` bounds every response; `stop_token_ids` end a response (EOS by default), and
    so does the token that completes one of `stop_strings` in the decoded response (`cut_at_stop_strings`)."""

    max_new_tokens: int = 128
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0: no top-k truncation
    stop_token_ids: tuple[int, ...] = ()
    stop_strings: tuple[str, ...] = ()


@dataclass
class Rollouts:
    """A batch of sampled responses, right-padded. B sequences, T = the longest response.

    response_ids   [B, T] long   sampled tokens, pad_token_id after the end
    logprobs       [B, T] fp32   log mu(y_t): the sampler's log-prob of each sampled token (0 after the end)
    mask           [B, T] bool   True on real response tokens
    lengths        [B]    long   number of response tokens (the stop token included)
    finished       [B]    bool   True where the response ended with a stop token, False where it was truncated
    prompt_ids     list of B lists of prompt token ids (unpadded)
    distributions  [B, T, V] fp32 or None   log q(.) at each response position: the whole distribution the engine
                                            sampled from (-inf outside a top-k/top-p support, 0 after the end),
                                            where asked for (`generate(..., keep_distributions=True)`)
    """

    prompt_ids: list[list[int]]
    response_ids: torch.Tensor
    logprobs: torch.Tensor
    mask: torch.Tensor
    lengths: torch.Tensor
    finished: torch.Tensor
    distributions: torch.Tensor | None = None
    # MoE models, where asked for (`generate(..., keep_routing=True)`): each router's logits [B, T, L, E] and chosen
    # experts [B, T, L, k] at the inputs of the response positions (`unison.routing`; past a row's end, logits 0 and
    # expert 0 where the native engine's fast path had dropped the row)
    routing: tuple[torch.Tensor, torch.Tensor] | None = None
    # and each row's experts at every position of [prompt, response] ([n + len, L, k], -1: none recorded), for the
    # learner to route with (`unison.routing.install_replay`)
    replay: list[torch.Tensor] | None = None

    def __len__(self) -> int:
        return len(self.prompt_ids)

    def responses(self) -> list[list[int]]:
        """Response token ids per sequence, unpadded."""
        return [row[:n].tolist() for row, n in zip(self.response_ids, self.lengths.tolist())]

    def select(self, index) -> Rollouts:
        """A sub-batch (index: list of ints or a 1-D long tensor), trimmed to its longest response."""
        idx = torch.as_tensor(index, dtype=torch.long)
        T = max(int(self.lengths[idx].max().item()), 1) if len(idx) else 0
        return Rollouts(
            prompt_ids=[self.prompt_ids[i] for i in idx.tolist()],
            response_ids=self.response_ids[idx, :T],
            logprobs=self.logprobs[idx, :T],
            mask=self.mask[idx, :T],
            lengths=self.lengths[idx],
            finished=self.finished[idx],
            distributions=None if self.distributions is None else self.distributions[idx, :T],
            replay=None if self.replay is None else [self.replay[i] for i in idx.tolist()],
        )

    @classmethod
    def concat(cls, parts: list[Rollouts], pad_token_id: int = 0) -> Rollouts:
        """The rows of `parts` in order, padded to the longest response."""
        T = max(p.response_ids.shape[1] for p in parts)

        def pad(t, value):
            return torch.nn.functional.pad(t, (0, T - t.shape[1]), value=value)

        return cls(
            prompt_ids=[ids for p in parts for ids in p.prompt_ids],
            response_ids=torch.cat([pad(p.response_ids, pad_token_id) for p in parts]),
            logprobs=torch.cat([pad(p.logprobs, 0.0) for p in parts]),
            mask=torch.cat([pad(p.mask, False) for p in parts]),
            lengths=torch.cat([p.lengths for p in parts]),
            finished=torch.cat([p.finished for p in parts]),
            distributions=(
                torch.cat(
                    [torch.nn.functional.pad(p.distributions, (0, 0, 0, T - p.distributions.shape[1])) for p in parts]
                )
                if all(p.distributions is not None for p in parts)
                else None
            ),
            routing=_concat_routing([p.routing for p in parts], T),
            replay=[r for p in parts for r in p.replay] if all(p.replay is not None for p in parts) else None,
        )

    def truncated(self, lengths: torch.Tensor, finished: torch.Tensor, pad_token_id: int = 0) -> Rollouts:
        """The same rows cut to `lengths` (each at most its own), with `finished` flags; trimmed to the longest."""
        T = max(int(lengths.max()), 1) if len(lengths) else 0
        mask = torch.arange(T)[None, :] < lengths[:, None]
        return Rollouts(
            prompt_ids=self.prompt_ids,
            response_ids=self.response_ids[:, :T].masked_fill(~mask, pad_token_id),
            logprobs=self.logprobs[:, :T].masked_fill(~mask, 0.0),
            mask=mask,
            lengths=lengths,
            finished=finished,
            distributions=None
            if self.distributions is None
            else self.distributions[:, :T].masked_fill(~mask[..., None], 0.0),
            replay=None
            if self.replay is None
            else [
                torch.cat([r[: len(p) + int(n) - 1], torch.full_like(r[:1], -1)]) if n else r[: len(p)]
                for r, p, n in zip(self.replay, self.prompt_ids, lengths)
            ],
        )


def _concat_routing(parts: list, T: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Routing records ([B, t, L, E] logits, [B, t, L, k] experts) of parts, padded to T positions and joined."""
    if any(p is None for p in parts):
        return None

    def pad(t):
        return torch.nn.functional.pad(t, (0, 0, 0, 0, 0, T - t.shape[1]))

    return torch.cat([pad(p[0]) for p in parts]), torch.cat([pad(p[1]) for p in parts])


def stop_string_end(ids: list[int], decode, strings: tuple[str, ...]) -> int | None:
    """The number of tokens of `ids` up to and including the one whose text completes the first occurrence of any
    of `strings` in the decoded response (None: none occurs). Found by bisection on decoded prefixes."""
    if not ids or not any(s in decode(ids) for s in strings):
        return None
    lo, hi = 1, len(ids)  # the smallest n whose prefix holds a stop string
    while lo < hi:
        mid = (lo + hi) // 2
        if any(s in decode(ids[:mid]) for s in strings):
            hi = mid
        else:
            lo = mid + 1
    return lo


def response_text(tokenizer, prompt: list[int], ids: list[int]) -> str:
    """A response's text as it reads after its prompt (special tokens left out, as vLLM matches stop strings): the
    prompt and response decoded together, less the prompt's text, so that a tokenizer that drops a leading space
    when it decodes a sequence on its own (SentencePiece) keeps the response's."""
    whole = tokenizer.decode(list(prompt) + list(ids), skip_special_tokens=True)
    head = tokenizer.decode(list(prompt), skip_special_tokens=True)
    return whole[len(head) :] if whole.startswith(head) else tokenizer.decode(list(ids), skip_special_tokens=True)


def cut_at_stop_strings(rollouts: Rollouts, text_of, strings: tuple[str, ...], pad_token_id: int = 0) -> Rollouts:
    """Each response ended at the token that completes a stop string (kept, as a stop token is), marked finished;
    `text_of(prompt_ids, response_ids)` is the response's text (`response_text`).

    Both engines apply this to what they sampled, so a response ends at the same token whichever engine sampled it;
    the tokens after it were sampled (or not) with the same distribution and are dropped with their log-probs."""
    if not strings:
        return rollouts
    lengths, finished = rollouts.lengths.clone(), rollouts.finished.clone()
    for i, (prompt, ids) in enumerate(zip(rollouts.prompt_ids, rollouts.responses())):
        end = stop_string_end(ids, lambda part, p=prompt: text_of(p, part), strings)
        if end is not None:
            lengths[i], finished[i] = end, True
    if torch.equal(lengths, rollouts.lengths) and torch.equal(finished, rollouts.finished):
        return rollouts
    return rollouts.truncated(lengths, finished, pad_token_id)


def check_prompts(prompt_ids: list[list[int]]) -> None:
    """Every engine's precondition: at least one prompt, none empty."""
    if not prompt_ids:
        raise ValueError("generate() needs at least one prompt")
    if any(len(p) == 0 for p in prompt_ids):
        raise ValueError("every prompt needs at least one token")


@runtime_checkable
class RolloutEngine(Protocol):
    """A sampler holding a copy of the policy's weights in the rollout dtype."""

    dtype: torch.dtype

    def generate(
        self,
        prompt_ids: list[list[int]],
        params: SamplingParams,
        progress: bool = False,
        keep_distributions: bool = False,
    ) -> Rollouts:
        """Sample one response per prompt (repeat a prompt G times for a group); with `keep_distributions`, keep
        the whole distribution sampled from at each position (`Rollouts.distributions`) where the engine can."""
        ...

    def load_weights(self, named_tensors) -> None:
        """Replace the engine's weights in place with `(name, tensor)` pairs, cast to the engine's dtype."""
        ...

    def release_weights(self) -> None:
        """Free the weights where the engine can until the next `load_weights`, which then gives every parameter (a
        synchronous run calls it between sampling and the sync, while the learner updates). An engine may keep the
        tensors that load gives it as its own (the native engine does): the caller hands them over and writes them
        no more (`Learner.sync` exports fresh ones); the checksum after the load then confirms every parameter
        arrived under its name, in its shape and dtype."""
        ...

    def weights_checksum(self) -> str:
        """A checksum over every parameter the engine holds, as stored (see `unison.precision.checksum`)."""
        ...

    def describe(self) -> str:
        """One line: the engine, its dtype and the decode path it runs."""
        ...

    def rng_state(self) -> torch.Tensor:
        """The state of the engine's sampling randomness (saved in checkpoints)."""
        ...

    def set_rng_state(self, state: torch.Tensor) -> None:
        """Restore a state from `rng_state`: the next `generate` samples as it would have after it."""
        ...

    def overflow_guard(self, mode: str, where: str):
        """The fp16 activation guard of the engine's forward (`unison.overflow.OverflowGuard`, `mode` as
        precision.on_activation_overflow), or None where the engine runs in another dtype, the mode is off, or its
        forward is out of reach (saying so)."""
        ...

    def close(self) -> None:
        """Free the engine's model and caches; an engine is also a context manager that closes on exit."""
        ...

    def __enter__(self) -> RolloutEngine: ...

    def __exit__(self, *exc) -> None: ...
