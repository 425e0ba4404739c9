"""Step 0 of method.md, the conditioning stage: teach the policy to follow the preference it is given.

A policy learns to read its preference only if some stage teaches it (RiC's offline stage does
this for its reward-in-context prompts). Read top to bottom::

    0a corpus    (task text, response, raw reward vector) rows in prompt groups          (M rows)
                 - a data set with responses (hh-rlhf, TL;DR): its own responses
                 - a task with prompts only: a seeded pool sampled from the base policy under
                   Dirichlet preferences and the task's pool instructions (``task.pool_instructions``,
                   e.g. "Answer in one short sentence."), so that the pool spans the trade-off;
                   the instruction is never part of a training prompt
    0b normalise R = (raw - mean) / std with the corpus's statistics (as RiC normalises over its
                 whole scored training set); these become the run's reward statistics
    0c label     each row gets a preference it achieves (:func:`achieved_labels`)          (E rows)
    0d SFT       on (template(text, w), response), loss on the response tokens only,
                 w in the prompt and, for preference-aware LoRA, in the weights

The scored corpus and the conditioned policy are cached under ``conditioning.cache``, each keyed
by a hash of what it depends on, so every method and seed of a comparison starts from the same
conditioned policy and pays for it once. The stage is checkpointed and resumable; its cost is a
:class:`~meal.harness.budget.Budget` of its own, reported apart from the online budget.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from meal.harness.budget import Budget
from meal.harness.checkpoint import latest_checkpoint, load_checkpoint, rng_state, save_checkpoint
from meal.harness.corpus import ReplaySet, ScoredCorpus
from meal.harness.distributed import AdamWStep, Dist
from meal.harness.tracking import JsonlWriter
from meal.policy.losses import build_batch, policy_step
from meal.policy.rollout import (ConditionedPolicy, Conditioner, Draws, PromptOrder, Queries, Scoring, draw_preferences,
                                 rollout)
from meal.policy.sampling import GenerationSettings
from meal.rewards import RewardNormalizer, RewardSet
from meal.tasks import Response, TaskData

log = logging.getLogger(__name__)


def sample_pool(policy: ConditionedPolicy, texts: Sequence[str], instructions: Sequence[str],
                settings: GenerationSettings, reward_set: RewardSet, draws: Draws, dist: Dist | None = None
                ) -> ScoredCorpus:
    """0a for a task with prompts only: ``draws.samples`` responses per (prompt, instruction) from the policy.

    Each response is sampled under its own Dirichlet(alpha) preference, from the prompt with the
    instruction appended to the task text, and scored against the plain task text. Chunk c of
    ``settings.batch_size`` jobs is sampled with seed ``draws.seed + c`` on process ``c mod world``, so the
    pool is the same whatever the number of processes.
    """
    dist = dist or Dist()
    objectives = policy.objectives
    jobs = [(p, ins) for p in range(len(texts)) for ins in instructions for _ in range(draws.samples)]
    prefs = draw_preferences(len(jobs), len(objectives), draws.alpha, np.random.default_rng(draws.seed))
    bs = settings.batch_size
    mine: list[tuple[int, list[str], list[bool], torch.Tensor, int]] = []
    chunks = range(0, len(jobs), bs)
    for c, start in enumerate(tqdm(chunks, desc="conditioning: sampling the pool", unit="batch",
                                   disable=not dist.main)):
        if c % dist.world != dist.rank:
            continue
        part = jobs[start:start + bs]
        prompt_texts = [texts[p] + (f"\n\n{ins}" if ins else "") for p, ins in part]
        asked = Queries(prompt_texts, prefs[start:start + bs], 1, draws.seed + c, [texts[p] for p, _ in part])
        ro = rollout(policy, asked, settings, Scoring(reward_set))
        mine.append((start, [t[0] for t in ro.texts], [f[0] for f in ro.finished], ro.raw[:, 0], ro.num_tokens))
    parts = sorted((x for rank_parts in dist.all_gather(mine) for x in rank_parts), key=lambda x: x[0])
    responses = [t for part in parts for t in part[1]]
    finished = [f for part in parts for f in part[2]]
    raw = torch.cat([part[3] for part in parts])
    budget = Budget()
    budget.add_sampling(len(jobs), sum(part[4] for part in parts), len(objectives))
    return ScoredCorpus(list(objectives), [texts[p] for p, _ in jobs], responses, finished,
                        [p for p, _ in jobs], raw, "pool", budget)


def score_responses(rows: Sequence[Response], reward_set: RewardSet, batch_size: int = 64,
                    dist: Dist | None = None) -> ScoredCorpus:
    """0a for a data set with responses: score each of them (in batches, sharded over processes)."""
    dist = dist or Dist()
    group_of: dict[str, int] = {}
    groups = [group_of.setdefault(r.group, len(group_of)) for r in rows]
    mine = []
    starts = range(0, len(rows), batch_size)
    for c, s in enumerate(tqdm(starts, desc="conditioning: scoring the data set's responses", unit="batch",
                               disable=not dist.main)):
        if c % dist.world == dist.rank:
            part = rows[s:s + batch_size]
            mine.append((s, reward_set.score([r.text for r in part], [r.response for r in part])))
    raw = torch.cat([x[1] for x in sorted((x for p in dist.all_gather(mine) for x in p), key=lambda x: x[0])])
    budget = Budget(reward_calls=len(rows) * len(reward_set.objectives))
    return ScoredCorpus(list(reward_set.objectives), [r.text for r in rows], [r.response for r in rows],
                        [True] * len(rows), groups, raw, "dataset", budget)


def achieved_labels(rewards: torch.Tensor, groups: Sequence[int], rule: str, rng: np.random.Generator,
                    tau: float = 1.0, per_group: int = 8) -> tuple[np.ndarray, torch.Tensor]:
    """0c: the preference each row achieves. rewards: normalised (M, K). Returns (rows (E,), labels (E, K)).

    - ``region``: per prompt group, ``per_group`` preferences w ~ Dirichlet(1); each is assigned to
      the group's response that is best under it (argmax_j w . R_j), which is labelled w. A response
      is labelled with the preferences for which it is the best trade-off its group offers;
      responses that are best for none (dominated in every direction) are not trained on. Within a
      group, a larger w_k never selects a response with a smaller R_k (an argmax of a linear score).
    - ``rank``: every row; per objective, the row's rank within its group scaled to [0, 1] (ties
      averaged), the K ranks normalised to sum 1 (uniform where all are 0).
    - ``softmax``: every row; softmax(R / tau) (method.md step 5's achieved preference).
    - ``scores``: every row; R itself (RiC's offline stage writes the normalised rewards into the prompt).
    """
    r = rewards.double().numpy()
    m, k = r.shape
    g = np.asarray(groups)
    if rule == "softmax":
        return np.arange(m), torch.softmax(rewards.float() / tau, dim=-1)
    if rule == "scores":
        return np.arange(m), rewards.float().clone()
    rows, labels = [], []
    for grp in np.unique(g):
        idx = np.nonzero(g == grp)[0]
        if rule == "region":
            w = rng.dirichlet(np.ones(k), size=per_group)  # (per_group, K)
            rows.extend(idx[np.argmax(w @ r[idx].T, axis=1)].tolist())
            labels.extend(w.tolist())
        elif rule == "rank":
            from scipy.stats import rankdata

            if len(idx) < 2:
                continue
            ranks = np.stack([(rankdata(r[idx, j]) - 1) / (len(idx) - 1) for j in range(k)], axis=1)  # (n, K)
            total = ranks.sum(1, keepdims=True)
            lab = np.where(total > 0, ranks / np.where(total > 0, total, 1), 1.0 / k)
            rows.extend(idx.tolist())
            labels.extend(lab.tolist())
        else:
            raise ValueError(f"conditioning.label: unknown rule {rule!r} (region | rank | softmax | scores)")
    return np.asarray(rows, dtype=int), torch.tensor(labels, dtype=torch.float32).reshape(-1, k)


def _digest(key: Any) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class StageSettings:
    """What the conditioning stage reads of the run's config (built at the edge,
    :func:`meal.harness.settings.read_run_spec`): the ``conditioning`` node, the task's name and pool
    instructions, the trainer's sampling and SFT values, and the resolved config (``resolved``, a plain
    dict) that the cache keys hash."""

    conditioning: Any  # the ``conditioning`` node (meal.config.ConditioningConfig)
    task_name: str
    pool_instructions: list[str]
    dirichlet_alpha: float
    max_prompt_tokens: int
    weight_decay: float
    max_grad_norm: float
    resolved: dict


def corpus_key(c: dict, source: str, precision: str) -> dict:
    """What the scored corpus depends on: data, rewards, and for a pool the policy, the precision it ran in
    (``precision``: its parameters' dtype, ``policy.dtype=auto`` resolved; a pool sampled in bf16 is not one
    sampled in float32) and how it was sampled (``c``: the run's resolved config)."""
    key = {"source": source, "data": c["task"]["data"],
           "rewards": {o: c["rewards"][o] for o in c["task"]["objectives"]},
           "max_rows": c["conditioning"]["max_rows"], "seed": c["conditioning"]["seed"]}
    if source == "pool":
        t = c["trainer"]
        key.update(policy=[c["policy"]["name_or_path"], c["policy"]["gguf_file"], precision],
                   template=c["task"]["template"], instructions=c["task"]["pool_instructions"],
                   max_new_tokens=c["task"]["max_new_tokens"], prompts=c["conditioning"]["pool_prompts"],
                   samples=c["conditioning"]["pool_samples"],
                   sampling=[t["top_p"], t["top_k"], t["temperature"], t["dirichlet_alpha"], t["max_prompt_tokens"]])
    return key


def stage_key(c: dict, corpus_digest: str, precision: str) -> dict:
    """What the conditioned policy depends on: the corpus, labels, policy (in ``precision``, as
    :func:`corpus_key`) and adapter, template, SFT (``c``: the run's resolved config)."""
    p, cond = c["policy"], dict(c["conditioning"])
    cond.pop("cache", None)
    return {"corpus": corpus_digest, "conditioning": cond, "template": c["task"]["template"],
            "policy": {**{k: p[k] for k in ("name_or_path", "gguf_file", "lora")}, "dtype": precision},
            "trainer": {k: c["trainer"][k] for k in ("max_prompt_tokens", "weight_decay", "max_grad_norm")}}


@dataclass
class ConditionedStart:
    """Where the conditioned policy lies, its reward statistics, what the stage cost, its labelled rows and
    (for the run that built or reused it, not after a resume) the scored corpus."""

    folder: str
    normalizer: RewardNormalizer
    info: dict
    replay: ReplaySet | None = None
    corpus: ScoredCorpus | None = None

    @property
    def weights(self) -> str:
        return os.path.join(self.folder, "policy.safetensors")


@dataclass
class StagePolicy:
    """The policy the stage samples its pool from and trains: the model, its trainable tensors by name, how a
    preference is written into its prompts and how it samples."""

    model: Any
    params: dict[str, torch.Tensor]
    condition: Conditioner
    settings: GenerationSettings

    @property
    def conditioned(self) -> ConditionedPolicy:
        return ConditionedPolicy(self.model, self.condition)


def _precision(model: torch.nn.Module) -> str:
    """The dtype the policy computes in ("float32", "bfloat16"), for the cache keys."""
    return str(next(model.parameters()).dtype).removeprefix("torch.")


def _corpus(s: StageSettings, data: TaskData, policy: StagePolicy, reward_set: RewardSet, root: str, dist: Dist
            ) -> tuple[ScoredCorpus, str]:
    """The scored corpus (0a), from the cache when the same key was built before."""
    c = s.conditioning
    source = c.source if c.source != "auto" else ("dataset" if data.responses else "pool")
    if source == "dataset" and not data.responses:
        raise ValueError(f"conditioning.source: task {s.task_name} has no responses of its own; use pool")
    key = corpus_key(s.resolved, source, _precision(policy.model))
    digest = _digest(key)
    path = os.path.join(root, f"corpus-{digest}.jsonl")
    if os.path.exists(path):
        log.info("conditioning corpus from the cache %s", path)
        return ScoredCorpus.load(path), digest
    tic = time.perf_counter()
    rng = np.random.default_rng(c.seed)
    if source == "dataset":
        rows = list(data.responses)
        if c.max_rows and len(rows) > c.max_rows:  # a seeded choice of whole prompt groups
            order = {g: i for i, g in enumerate(rng.permutation(sorted({r.group for r in rows})))}
            rows = sorted(rows, key=lambda r: order[r.group])[:c.max_rows]
        corpus = score_responses(rows, reward_set, dist=dist)
    else:
        texts = [e.text for e in data.train]
        if c.pool_prompts:
            texts = [texts[i] for i in sorted(rng.permutation(len(texts))[:c.pool_prompts])]
        corpus = sample_pool(policy.conditioned, texts, list(s.pool_instructions), policy.settings, reward_set,
                             Draws(c.pool_samples, s.dirichlet_alpha, c.seed), dist)
    corpus.budget.seconds = time.perf_counter() - tic
    if dist.main:
        os.makedirs(root, exist_ok=True)
        corpus.save(path)
        with open(os.path.join(root, f"corpus-{digest}.key.json"), "w") as f:
            json.dump(key, f, indent=2, default=str)
    dist.barrier()
    log.info("conditioning corpus: %d %s rows, %s", len(corpus), source, corpus.budget.summary())
    return corpus, digest


def condition_policy(s: StageSettings, data: TaskData, policy: StagePolicy, reward_set: RewardSet, run_dir: str,
                     open_stage_logger: Callable[[str], Any], dist: Dist | None = None) -> ConditionedStart:
    """Step 0: build or reuse the conditioned policy and copy its weights into ``policy.params``.

    Runs inside its own random state (``fork_rng`` seeded by ``conditioning.seed``), so the online
    stage draws the same numbers whether the stage ran or came from the cache.
    """
    dist = dist or Dist()
    c = s.conditioning
    root = os.path.expanduser(c.cache) if c.cache else os.path.join(run_dir, "conditioning-cache")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(c.seed)
        corpus, corpus_digest = _corpus(s, data, policy, reward_set, root, dist)
        normalizer = RewardNormalizer.fit(corpus.raw, corpus.objectives)
        key = stage_key(s.resolved, corpus_digest, _precision(policy.model))
        folder = os.path.join(root, f"stage-{_digest(key)}")
        done = os.path.join(folder, "stage.json")
        rows, labels = achieved_labels(normalizer(corpus.raw), corpus.groups, c.label,
                                       np.random.default_rng(c.seed), c.tau, c.labels_per_group)
        if not os.path.exists(done):
            budget = _sft(s, policy, corpus, (rows, labels), folder, open_stage_logger, dist)
            info = {"corpus": {"source": corpus.source, "rows": len(corpus), "digest": corpus_digest,
                               "budget": corpus.budget.as_dict()},
                    "labels": {"rule": c.label, "rows": int(len(rows)),
                               "distinct_responses": int(len(set(rows.tolist())))},
                    "sft": budget.as_dict(), "normalizer": normalizer.__dict__,
                    "budget": _total(corpus.budget, budget).as_dict(), "key": key}
            if dist.main:
                _finish_stage(folder, policy.params, info)
            dist.barrier()
    with open(done) as f:
        info = json.load(f)
    _copy_into(policy.params, load_file(os.path.join(folder, "policy.safetensors")), folder)
    log.info("conditioned policy %s (%s)", folder, Budget.from_dict(info["budget"]).summary())
    return ConditionedStart(folder, normalizer, info, ReplaySet.from_corpus(corpus, rows, labels), corpus)


def _total(a: Budget, b: Budget) -> Budget:
    return Budget(a.responses + b.responses, a.tokens + b.tokens, a.reward_calls + b.reward_calls,
                  a.steps + b.steps, a.meta_steps + b.meta_steps, a.seconds + b.seconds)


def _sft(s: StageSettings, policy: StagePolicy, corpus: ScoredCorpus, labelled: tuple[np.ndarray, torch.Tensor],
         folder: str, open_stage_logger, dist: Dist) -> Budget:
    """0d: ``conditioning.steps`` AdamW steps on (template(text, w), response) over the ``labelled`` (corpus
    row, label) pairs; checkpointed in ``folder``."""
    c = s.conditioning
    model, params, condition = policy.model, policy.params, policy.condition
    rows, labels = labelled
    if c.batch_size % dist.world:
        raise ValueError(f"conditioning.batch_size: {c.batch_size} does not split over {dist.world} processes")
    optimizer = AdamWStep(params, c.lr, s.weight_decay, s.max_grad_norm, dist)
    order = PromptOrder(len(rows), c.seed)
    budget, start = Budget(), 0
    ckpt = latest_checkpoint(folder)
    if ckpt is not None:
        state = load_checkpoint(ckpt, params, None, rank=dist.rank)
        optimizer.load_state_dict(state["optimizer"])
        order = PromptOrder(len(rows), c.seed, **state["order"])
        budget, start = Budget.from_dict(state["budget"]), state["step"]
        log.info("conditioning stage resumed at step %d from %s", start, ckpt)
    metrics_file = JsonlWriter(os.path.join(folder, "metrics.jsonl"))
    if dist.main:
        os.makedirs(folder, exist_ok=True)
        metrics_file.truncate_after(start)  # steps past the checkpoint are done again
    logger = open_stage_logger(folder) if dist.main else None
    tok = condition.tokenizer
    try:
        bar = tqdm(range(start, c.steps), initial=start, total=c.steps, desc="conditioning: SFT", unit="step",
                   disable=not dist.main)
        for step in bar:
            tic = time.perf_counter()
            pos = dist.shard(order.next(c.batch_size))  # this process's share of the step's labelled rows
            w = labels[pos]  # (b, K)
            src = rows[pos].tolist()  # their corpus rows
            batch = build_batch(tok, condition([corpus.texts[i] for i in src], w), [corpus.responses[i] for i in src],
                                [corpus.finished[i] for i in src], s.max_prompt_tokens, prefs=w)
            lr = c.lr * (1.0 - step / max(1, c.steps))  # linear decay to 0, as RiC's offline stage
            for group in optimizer.optimizer.param_groups:
                group["lr"] = lr
            loss, grad_norm = policy_step(model, optimizer, batch, torch.ones(len(batch)), c.micro_batch_size, dist)
            if not np.isfinite(loss):
                raise FloatingPointError(f"conditioning step {step + 1}: the loss is {loss}; the last checkpoint in "
                                         f"{folder}/checkpoints is intact")
            budget.steps += 1
            budget.seconds += time.perf_counter() - tic
            metrics = {"warmup/loss": loss, "warmup/grad_norm": grad_norm, "warmup/lr": lr,
                       "warmup/label_entropy": float(-(w * w.clamp_min(1e-12).log()).sum(-1).mean())}
            if dist.main:
                metrics_file.write({"step": step + 1, **metrics})
                logger.log(metrics, step + 1)
                bar.set_postfix({"loss": f"{loss:.3f}"}, refresh=False)
            if c.save_every and (step + 1) % c.save_every == 0 and step + 1 < c.steps:
                state = {"optimizer": optimizer.state_dict(), "order": order.state, "budget": budget.as_dict()}
                rng = dist.gather(rng_state())
                if dist.main:
                    save_checkpoint(folder, step + 1, params, None, state, keep=1, rng=rng)
                dist.barrier()
        return budget
    finally:
        if logger is not None:
            logger.finish()


def _copy_into(params: dict[str, torch.Tensor], saved: dict[str, torch.Tensor], where: str) -> None:
    missing = sorted(set(params) - set(saved))
    if missing:
        raise ValueError(f"conditioned policy {where} does not match the policy: missing {missing[:3]} "
                         f"(different LoRA settings?)")
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(saved[n].to(p.dtype))
            p.grad = None  # no gradient of the stage's last step reaches the online stage's first


def _finish_stage(folder: str, params: dict[str, torch.Tensor], info: dict) -> None:
    """Write the final weights and stage.json (last, atomically: its presence means done); drop checkpoints."""
    save_file({n: p.detach().contiguous().cpu() for n, p in params.items()}, os.path.join(folder, "policy.tmp"))
    os.replace(os.path.join(folder, "policy.tmp"), os.path.join(folder, "policy.safetensors"))
    with open(os.path.join(folder, "stage.json.tmp"), "w") as f:
        json.dump(info, f, indent=2, default=str)
    os.replace(os.path.join(folder, "stage.json.tmp"), os.path.join(folder, "stage.json"))
    shutil.rmtree(os.path.join(folder, "checkpoints"), ignore_errors=True)


def record_conditioning(run_dir: str, start: ConditionedStart) -> None:
    """Copy the stage's record, weights and labelled rows into the run folder (``conditioning/``), so
    that the run is self-contained (a resume replays the same rows) and ``meal-eval
    checkpoint=conditioned`` can evaluate its starting point."""
    out = os.path.join(run_dir, "conditioning")
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "stage.json"), "w") as f:
        json.dump({"folder": start.folder, **start.info}, f, indent=2, default=str)
    if start.replay is not None:
        start.replay.save(os.path.join(out, "replay.jsonl"))
    for name in ("policy.safetensors", "metrics.jsonl"):
        src, dst = os.path.join(start.folder, name), os.path.join(out, name)
        if os.path.exists(src) and not os.path.exists(dst):
            try:
                os.link(src, dst)  # the same bytes, no copy where the file system allows
            except OSError:
                shutil.copyfile(src, dst)


def read_conditioning(run_dir: str) -> ConditionedStart | None:
    """The conditioning record of a run folder (None when the run started from the base policy)."""
    path = os.path.join(run_dir, "conditioning", "stage.json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        info = json.load(f)
    replay = os.path.join(os.path.dirname(path), "replay.jsonl")
    return ConditionedStart(os.path.dirname(path), RewardNormalizer(**info["normalizer"]), info,
                            ReplaySet.load(replay) if os.path.exists(replay) else None)


def conditioning_budget(start: ConditionedStart | None) -> Budget | None:
    return None if start is None else Budget.from_dict(start.info.get("budget"))
