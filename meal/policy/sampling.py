"""Sampling responses and rejection sampling (method.md step 4).

:func:`generate` samples from the policy in batches with no gradient (:func:`decode`: each row leaves the
batch when it ends); :func:`select_best` keeps, for each prompt, the top-m of its N responses by the
scalarised score ``s_ij = w_i . R_ij``.
"""

from __future__ import annotations

import hashlib
import inspect
import re
from collections import Counter
from dataclasses import dataclass
from typing import Sequence

import torch
from transformers import DynamicCache, GenerationMixin

from meal.policy.preference_lora import preference_weights

# what a model's forward and ``generate`` call the key/value cache ("past_key_values" in transformers releases
# before its rename to "cache")
_CACHE_KWARG = "cache" if "cache" in inspect.signature(GenerationMixin.prepare_inputs_for_generation).parameters \
    else "past_key_values"


@dataclass
class GenerationSettings:
    """How responses are sampled (the evaluation protocol uses top_p 0.9, top_k 0, temperature 1)."""

    max_new_tokens: int = 48
    top_p: float = 0.9
    top_k: int = 0
    temperature: float = 1.0
    batch_size: int = 32
    max_prompt_tokens: int = 512
    sampler: object = None  # a callable like generate() (e.g. meal.policy.vllm_backend.VLLMSampler); None: generate()
    greedy: bool = False  # the most likely token at every step (meal-generate / meal-export checks), no sampling
    # "row": a seeded call draws each response with its own generator, seeded by (seed, prompt, preference,
    # repeat), so a response does not depend on the batch it is generated in (evaluation, meal-generate);
    # "call": one seed for the whole call (training's seeded pools: the conditioning stage, the normaliser)
    seeding: str = "call"

    def record(self) -> dict:
        """What a front's responses depend on (front.json ``extra["generation"]``; meal-compare refuses
        to compare fronts whose records differ). The batch size is not in it: with ``seeding="row"``
        it changes no response (up to floating-point reductions of the batch shape)."""
        backend = "hf" if self.sampler is None else type(self.sampler).__name__
        return {"max_new_tokens": self.max_new_tokens, "top_p": self.top_p, "top_k": self.top_k,
                "temperature": self.temperature, "max_prompt_tokens": self.max_prompt_tokens,
                "greedy": self.greedy, "seeding": self.seeding, "backend": backend}


@dataclass
class Generation:
    """Sampled responses: ``texts[b]`` for ``prompts[b]``; ``finished[b]`` is False when cut at the budget;
    ``ids[b]``: its token ids, eos included when it finished (None where the sampler does not return them)."""

    texts: list[str]
    finished: list[bool]
    num_tokens: int
    ids: list[list[int]] | None = None


class SamplingWarper:
    """Temperature, then top-k, then top-p (nucleus) on next-token logits (B, V): what Hugging Face's
    warpers do, with a faster top-p.

    Hugging Face's top-p sorts the whole vocabulary at every step (55 ms for 32 rows of SmolLM2's
    49,152 tokens on 2 CPU cores, a third of the sampling time). The nucleus is almost always among
    the largest few hundred logits: this takes the ``candidates`` largest (``topk``), keeps a token
    when the probability mass strictly above it is < top_p (the smallest set whose mass reaches
    top_p, as Hugging Face keeps), and falls back to a full sort for the rows whose candidates hold
    less than top_p of the mass. The kept set is the same as Hugging Face's up to float rounding at
    its boundary (the masses are summed in another order).
    """

    def __init__(self, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, candidates: int = 512):
        self.temperature, self.top_k, self.top_p, self.candidates = temperature, top_k, top_p, candidates

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self.temperature != 1.0:
            scores = scores / self.temperature
        if self.top_k > 0 and self.top_k < scores.shape[-1]:
            kth = scores.topk(self.top_k, dim=-1).values[:, -1:]
            scores = scores.masked_fill(scores < kth, float("-inf"))
        if self.top_p >= 1.0:
            return scores
        logp = scores.float().log_softmax(-1)  # (B, V)
        k = min(self.candidates, scores.shape[-1])
        top, idx = logp.topk(k, dim=-1)  # (B, k), largest first
        probs = top.exp()
        keep = (probs.cumsum(-1) - probs) < self.top_p  # mass strictly above each candidate < top_p
        keep[:, 0] = True
        short = probs.sum(-1) < self.top_p  # the nucleus reaches beyond the candidates: sort these rows
        if short.any():
            full, full_idx = logp[short].sort(dim=-1, descending=True)
            p = full.exp()
            full_keep = (p.cumsum(-1) - p) < self.top_p
            full_keep[:, 0] = True
            removed_full = torch.ones_like(full_keep).scatter(1, full_idx, ~full_keep)
        removed = torch.ones_like(scores, dtype=torch.bool).scatter(1, idx, ~keep)
        if short.any():
            removed[short] = removed_full
        return scores.masked_fill(removed, float("-inf"))


def row_seeds(seed: int, keys: Sequence[str]) -> list[int]:
    """One 63-bit seed per row, a hash of (seed, the row's key, how many times this key came before in
    ``keys``): a response's randomness depends on what is asked and never on its position or batch;
    repeats of a key get different samples. The key is the prompt before its preference is written
    in (:meth:`meal.policy.rollout.ConditionedPolicy.respond`), so the grid's preferences share one random
    stream per prompt (common random numbers: differences between points come from the preference).

    >>> a = row_seeds(0, ["x", "y", "x"]); b = row_seeds(0, ["y", "x"])
    >>> a[1] == b[0], a[0] == b[1], a[0] != a[2], row_seeds(1, ["x"])[0] != a[0]
    (True, True, True, True)
    """
    seen: Counter = Counter()
    out = []
    for key in keys:
        repeat = seen[key]
        seen[key] += 1
        out.append(_hashed_seed(seed, repeat, key))
    return out


def iteration_seed(seed: int, iteration: int) -> int:
    """The seed of an online iteration's rollout (with ``seeding="row"``, each response's own seed then
    hashes it with its prompt and repeat: :func:`row_seeds`), the same on every process."""
    return _hashed_seed(seed, "iteration", iteration)


def _hashed_seed(*parts) -> int:
    """A 63-bit seed from a hash of ``parts`` (joined by the unit separator)."""
    digest = hashlib.blake2b("\x1f".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


class RowDraw:
    """Draws each row's next token with that row's own generator, by the Gumbel-max trick: the argmax
    of the warped log-probabilities plus Gumbel noise (one draw per vocabulary entry from the row's
    generator) is an exact sample of the warped distribution; it is returned as logits that are -inf
    except at the drawn token, so greedy decoding emits it. Row b's t-th token uses the t-th draws of
    ``generators[b]``, whatever else is in the batch. Gumbel-max rather than an inverse CDF: a
    rounding difference of the batch shape (1e-7 in the logits) flips an inverse-CDF draw whenever
    the uniform lands that close to any of the V cumulative boundaries, but a Gumbel-max draw only
    when the two best perturbed scores are that close (their gap is Exp(1) distributed)."""

    def __init__(self, warper: SamplingWarper, generators: Sequence[torch.Generator]):
        self.warper, self.generators = warper, list(generators)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        logp = self.warper(input_ids, scores).float().log_softmax(-1)  # (B, V), -inf outside the nucleus
        v = scores.shape[-1]
        u = torch.stack([torch.rand(v, generator=g) for g in self.generators]).to(logp.device)
        gumbel = -torch.log(-torch.log(u.clamp(min=1e-20, max=1 - 1e-7)))
        token = (logp + gumbel).argmax(-1, keepdim=True)
        return torch.full_like(scores, float("-inf")).scatter(1, token, 0.0)


@torch.no_grad()
def generate(model, tokenizer, prompts: Sequence[str], settings: GenerationSettings,
             generator_seed: int | None = None, prefs: torch.Tensor | None = None,
             row_keys: Sequence[str] | None = None) -> Generation:
    """Sample one response per prompt string (repeat a prompt N times for N samples): the responses Hugging
    Face's ``generate`` samples with the same draws, by meal's own loop (:func:`decode`), where a response
    that has ended leaves the batch.

    ``prefs`` (P, K): the preference of each prompt, for a policy with preference-aware LoRA
    layers (the preference written into the prompt is all that other policies see).

    Prompts are left-padded in batches of ``settings.batch_size``. With ``generator_seed`` the call
    runs under its own seed inside ``fork_rng``: it returns the same responses every time
    (evaluation) and leaves the caller's RNG stream untouched (training is not perturbed by
    periodic evaluations). With ``settings.seeding == "row"`` as well, each response is drawn with
    its own generator (:func:`row_seeds` of ``row_keys``, default the prompts; :class:`RowDraw`):
    the same response in a batch of 1 or of 32.
    """
    if generator_seed is not None:
        devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(generator_seed)
            gens = None
            if settings.seeding == "row" and not settings.greedy:
                gens = [torch.Generator().manual_seed(s) for s in row_seeds(generator_seed, row_keys or prompts)]
            return _generate(model, tokenizer, prompts, settings, prefs, gens)
    return _generate(model, tokenizer, prompts, settings, prefs, None)


def _generate(model, tokenizer, prompts: Sequence[str], settings: GenerationSettings, prefs: torch.Tensor | None,
              generators: list[torch.Generator] | None) -> Generation:
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    eos = tokenizer.eos_token_id
    pad = eos if tokenizer.pad_token_id is None else tokenizer.pad_token_id
    texts, finished, n_tokens, ids = [], [], 0, []
    warper = SamplingWarper(settings.temperature, settings.top_k, settings.top_p)
    for i in range(0, len(prompts), settings.batch_size):
        chunk = list(prompts[i:i + settings.batch_size])
        chunk_prefs = None if prefs is None else prefs[i:i + settings.batch_size]
        enc = tokenizer(chunk, return_tensors="pt", padding=True, truncation=True,
                        max_length=settings.max_prompt_tokens, add_special_tokens=False).to(device)
        if generators is not None:  # each row draws with its own generator
            choose = _RowChoice(warper, generators[i:i + settings.batch_size])
        elif settings.greedy:
            choose = _greedy
        else:
            choose = _CallChoice(warper, len(chunk))
        new = decode(model, enc, chunk_prefs, shared_prefill(model, enc, chunk, chunk_prefs), choose,
                     settings.max_new_tokens, eos, pad)  # (b, T_new)
        for row in new:
            hit = (row == eos).nonzero()
            end = int(hit[0]) if len(hit) else len(row)
            n_tokens += end
            finished.append(bool(len(hit)))
            texts.append(tokenizer.decode(row[:end], skip_special_tokens=True).strip())
            ids.append(row[:end + 1].tolist())
    model.train(was_training)
    return Generation(texts, finished, n_tokens, ids)


def _greedy(scores: torch.Tensor, live: torch.Tensor) -> torch.Tensor:
    return scores.argmax(-1)


class _RowChoice:
    """Each live row's token drawn with its own generator (:class:`RowDraw`)."""

    def __init__(self, warper: SamplingWarper, generators: Sequence[torch.Generator]):
        self.warper, self.generators = warper, list(generators)

    def __call__(self, scores: torch.Tensor, live: torch.Tensor) -> torch.Tensor:
        return RowDraw(self.warper, [self.generators[j] for j in live.tolist()])(None, scores).argmax(-1)


class _CallChoice:
    """The live rows' tokens drawn from the process's stream as Hugging Face's sampling draws them
    (``torch.multinomial`` of the warped softmax), over a tensor of every row of the batch, the ended ones
    included: ``multinomial`` draws one exponential per entry of its (B, V) input, so a live row's draw is
    the one it gets when ended rows stay in the batch."""

    def __init__(self, warper: SamplingWarper, rows: int):
        self.warper, self.rows = warper, rows

    def __call__(self, scores: torch.Tensor, live: torch.Tensor) -> torch.Tensor:
        probs = self.warper(None, scores).softmax(-1)
        if len(live) < self.rows:
            full = probs.new_zeros(self.rows, probs.shape[-1])
            full[:, 0] = 1.0  # an ended row: any distribution draws as many numbers
            full[live] = probs
            probs = full
        return torch.multinomial(probs, num_samples=1).squeeze(1)[live]


def decode(model, enc, prefs: torch.Tensor | None, shared: dict, choose, max_new_tokens: int, eos: int, pad: int,
           compact: bool = True) -> torch.Tensor:
    """The new tokens (b, T) after each left-padded prompt of ``enc``, ``pad`` after a row's ``eos``; with
    ``compact`` a row leaves the batch as soon as it ends.

    Hugging Face's ``generate`` keeps an ended row in every forward pass to the last step (29% of the decode
    row-steps of a fresh-clone demo's final evaluation, README), and a decode step's time grows with its rows
    (SmolLM2-135M on 2 CPU cores, float32: 123-139 ms at 8 rows, 190-242 ms at 32; BENCHMARKS.md). Here the rows
    that ended are dropped from the key/value cache, the attention mask and the preferences before the next step;
    the other rows' logits are those of the whole batch up to the rounding of another batch shape (within 4e-5 in
    float32; in bf16 bit for bit on most shapes, docs/results/demo_compact/). ``choose(scores, live)`` picks the
    next token of each row of the batch from its float32 logits (``live``: their rows in the chunk); without
    ``compact`` it is the loop of ``generate`` (the ended rows computed and given ``pad``). ``shared``:
    :func:`shared_prefill`'s cache of all but the last prompt token, or ``{}``."""
    mask = enc["attention_mask"]
    rows = mask.shape[0]
    step = enc["input_ids"][:, -1:] if shared else enc["input_ids"]
    cache = shared[_CACHE_KWARG] if shared else DynamicCache(config=model.config)
    out = torch.full((rows, max_new_tokens), pad, dtype=torch.long, device=mask.device)
    live = torch.arange(rows, device=mask.device)
    ended = torch.zeros(rows, dtype=torch.bool, device=mask.device)
    for t in range(max_new_tokens):
        positions = _positions(mask)[:, -step.shape[1]:]
        with preference_weights(model, None if prefs is None else prefs[live.to(prefs.device)]):
            logits = model(input_ids=step, attention_mask=mask, position_ids=positions, use_cache=True,
                           logits_to_keep=1, **{_CACHE_KWARG: cache}).logits[:, -1].float()
        token = choose(logits, live).masked_fill(ended, pad)
        out[live, t] = token
        ended = ended | (token == eos)
        if t + 1 == max_new_tokens or ended.all():
            return out[:, :t + 1]
        if compact and ended.any():
            keep = (~ended).nonzero().squeeze(1)
            cache.batch_select_indices(keep)
            mask, live, token, ended = mask[keep], live[keep], token[keep], ended[keep]
        mask = torch.cat([mask, mask.new_ones(len(live), 1)], dim=-1)
        step = token[:, None]
    return out[:, :0]


def _positions(mask: torch.Tensor) -> torch.Tensor:
    """The position of each token of left-padded rows, as ``generate`` numbers them (padding at 1, masked)."""
    return (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 1)


def shared_prefill(model, enc, prompts: Sequence[str], prefs: torch.Tensor | None) -> dict:
    """The prompt's key/value cache of a batch whose rows repeat, computed once per distinct row, as
    ``{cache keyword: cache}`` for :func:`decode` (which then reads only each row's last prompt token), or
    ``{}`` when no row repeats.

    An online rollout asks for N samples of each (prompt, preference): N identical rows, whose prompts were each
    read N times (40% of a 32-row rollout's time for SmolLM2-135M on 2 CPU cores, BENCHMARKS.md). Rows are the same
    when their prompt string and their preference (what preference-aware LoRA layers read) are; the distinct ones
    read their prompt but its last token (:func:`_positions`), and the cache is copied to every row that repeats
    them. The responses are the ones an unshared call samples in float32; in bf16 the last prompt token, now a
    decode step, rounds differently and the draws part after a few tokens (docs/results/demo_shared_prefill/)."""
    slot: dict = {}  # (prompt, preference) -> its place among the distinct rows
    firsts, rows = [], []  # the first row of each distinct one; each row's distinct one
    for j, prompt in enumerate(prompts):
        key = (prompt, None if prefs is None else tuple(prefs[j].tolist()))
        if key not in slot:
            slot[key] = len(firsts)
            firsts.append(j)
        rows.append(slot[key])
    if len(firsts) == len(rows) or enc["input_ids"].shape[1] < 2:
        return {}
    distinct = torch.tensor(firsts)
    mask = enc["attention_mask"][distinct, :-1]
    positions = _positions(mask)
    cache = DynamicCache(config=model.config)
    with preference_weights(model, None if prefs is None else prefs[distinct]):
        model(input_ids=enc["input_ids"][distinct, :-1], attention_mask=mask, position_ids=positions,
              use_cache=True, logits_to_keep=1, **{_CACHE_KWARG: cache})
    cache.batch_select_indices(torch.tensor(rows, device=mask.device))
    return {_CACHE_KWARG: cache}


# the conditioning text echoed back: "(Preference weights: helpful 0.50, ...)", "Prefrence weight",
# "Preference 0.30, concise 0.70", or a list of two-decimal weights "helpful 1.00, concise 0.00"
TEMPLATE_ECHO = re.compile(r"(?i)\bpre?f\w*nces?\s+weights?\b|\bpreference\s+[0-2]\.\d\d\b"
                           r"|\b[\w-]+\s+[0-2]\.\d\d,\s*[\w-]+\s+[0-2]\.\d\d\b")


def is_degenerate(text: str, finished: bool, ngram: int = 3, min_distinct: float = 0.5) -> bool:
    """A response that is no answer: empty, echoing the preference template back (:data:`TEMPLATE_ECHO`),
    or cut at the token budget while looping.

    Looping: fewer than ``min_distinct`` of its word ``ngram``-grams are distinct.

    >>> is_degenerate("", True), is_degenerate("Boil the water first.", True)
    (True, False)
    >>> is_degenerate("the cat the cat the cat the cat the cat", False)
    True
    >>> is_degenerate("the cat the cat the cat the cat the cat", True)  # it stopped: an answer, if a poor one
    False
    >>> [is_degenerate(t, True) for t in ["Boil it. (Preference weights: helpful 0.50, concise 0.50)",
    ...  "Premise: Prefrence weight: helpful", "Elevate your fund (Preference 0.30, concise 0.70)",
    ...  "Set-up: Easy-to-use 1.00, concise 0.00.", "It costs 1.50 dollars, 2 cups of flour."]]
    [True, True, True, True, False]
    """
    words = text.split()
    if not words or TEMPLATE_ECHO.search(text):
        return True
    if finished or len(words) < 2 * ngram:
        return False
    grams = [tuple(words[i:i + ngram]) for i in range(len(words) - ngram + 1)]
    return len(set(grams)) < min_distinct * len(grams)


def degenerate_mask(texts: Sequence[Sequence[str]], finished: Sequence[Sequence[bool]]) -> torch.Tensor:
    """(B, N) True where response ``texts[b][n]`` is degenerate (:func:`is_degenerate`)."""
    return torch.tensor([[is_degenerate(t, f) for t, f in zip(row, done)] for row, done in zip(texts, finished)],
                        dtype=torch.bool)


def select_best(scores: torch.Tensor, top_m: int = 1) -> torch.Tensor:
    """Indices (B, m) of the top-m responses per prompt of a (B, N) score matrix (best first).

    >>> select_best(torch.tensor([[0.1, 0.9, 0.5], [2.0, -1.0, 3.0]])).tolist()
    [[1], [2]]
    """
    return scores.topk(top_m, dim=1).indices


def select_valid_best(scores: torch.Tensor, valid: torch.Tensor, top_m: int = 1
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """Best-of-N among the valid responses only: indices (B, m) and whether each is valid (B, m).

    A degenerate response is never kept, whatever its score; a prompt whose N responses are all
    degenerate keeps nothing (its entries come back with ``ok`` False). This is what stops the
    collapse seen in a static run: once most samples were empty, best-of-N kept an empty one and the
    SFT step taught the policy to stop at once.

    >>> keep, ok = select_valid_best(torch.tensor([[0.9, 0.1], [2.0, 1.0]]),
    ...                              torch.tensor([[False, True], [False, False]]))
    >>> keep.flatten().tolist(), ok.flatten().tolist()
    ([1, 0], [True, False])
    """
    keep = select_best(scores.masked_fill(~valid, float("-inf")), top_m)
    return keep, valid.gather(1, keep)


def scalarise(prefs: torch.Tensor, rewards: torch.Tensor) -> torch.Tensor:
    """s_ij = w_i . R_ij: prefs (B, K), rewards (B, N, K) -> (B, N)."""
    return torch.einsum("bk,bnk->bn", prefs, rewards)
