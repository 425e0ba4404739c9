"""``meal-generate``: ask a trained run something under a preference of your choice, and see the trade-off.

    meal-generate run_dir=RUN preference=[0.2,0.8] prompt="How do I boil an egg?"
    meal-generate run_dir=RUN preference=grid prompts_file=questions.jsonl score=true out=answers.jsonl
    echo "How do I boil an egg?" | meal-generate run_dir=RUN preference=[1,0] greedy=true

The run answers with its own method (Meal and static: the preference-conditioned policy; RiC: desired
scores; MORLHF: the policy trained for that preference, one of its grid; Rewarded Soups: the weights
interpolated at it; MetaAligner: its corrector on the policy it was stacked on). Prompts come from
``prompt`` (one), ``prompts_file`` (JSONL rows with ``text``, or plain lines) or standard input. It prints a
small table per prompt (one line per preference: the scores when ``score=true``, the start of the answer)
and writes every answer as a JSONL row to ``out`` (prompt, preference, response, finished; raw and
normalised scores with ``score=true``). Sampling is the evaluation protocol's (top_p 0.9, temperature 1,
seeded), or ``greedy=true``. Nothing is written into the run folder.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
from dataclasses import dataclass
from typing import Any

import hydra
from omegaconf import DictConfig

from meal.cli import CONF_DIR, launch, parse_preferences, user_errors
from meal.config import ConfigError, to_container
from meal.harness.saved_run import check_dtype, load_run, read_run

log = logging.getLogger("meal")


@dataclass
class Ask:
    """What to ask a run: prompts, preferences (each on the simplex, one weight per objective), how to
    sample, and whether to score the answers with the run's own rewards and normalisation."""

    prompts: list[str]
    preferences: list[list[float]]
    greedy: bool = False
    seed: int = 0
    score: bool = False
    max_new_tokens: int | None = None  # None: the run's task.max_new_tokens
    batch_size: int = 8
    dtype: str | None = None  # the policy's dtype (float32, bfloat16, ...); None: the run's policy.dtype


def read_prompts(prompt: str | None, prompts_file: str | None, stdin=None) -> list[str]:
    """The prompts: ``prompt``, else the rows of ``prompts_file`` (JSONL with ``text``, or plain lines),
    else the non-empty lines of ``stdin``."""
    from meal.tasks import read_jsonl

    if prompt:
        return [prompt]
    if prompts_file:
        if not os.path.isfile(prompts_file):
            raise ConfigError(f"prompts_file: no file {prompts_file}")
        if prompts_file.endswith(".jsonl"):
            return [e.text for e in read_jsonl(prompts_file)]
        with open(prompts_file, encoding="utf-8") as f:
            return [line.strip() for line in f if line.strip()]
    stdin = stdin or sys.stdin
    lines = [] if stdin.isatty() else [line.strip() for line in stdin if line.strip()]
    if not lines:
        raise ConfigError("prompt: nothing to ask (give prompt=..., prompts_file=... or lines on standard input)")
    return lines


def answer(run_dir: str, ask: Ask, checkpoint: str = "latest", trust: bool = False) -> list[dict[str, Any]]:
    """Ask ``run_dir``'s trained policy (its method's responder, ``checkpoint``'s weights): one row per
    prompt and preference (prompt-major). Everything that can be checked is checked before the policy loads."""
    import torch

    from meal.harness.preflight import build_rewards
    from meal.harness.settings import generation_settings
    from meal.methods import get
    from meal.rewards import RewardNormalizer

    cfg, folder = read_run(run_dir, checkpoint, trust=trust)
    objectives = list(cfg.task.objectives)
    if not ask.prompts:
        raise ConfigError("prompt: nothing to ask")
    if ask.dtype is not None:
        check_dtype(ask.dtype)
    reward_set = normalizer = None
    if ask.score:
        normalizer = RewardNormalizer.load(os.path.join(run_dir, "reward_stats.json"), objectives)
        reward_set = build_rewards(to_container(cfg.rewards), objectives)
    cfg, model, tok, _ = load_run(run_dir, checkpoint, trust=trust, dtype=ask.dtype)
    responder = get(cfg.method.recipe).responder(cfg, model, tok, run_dir)
    grid = responder.grid
    if grid is not None:  # MORLHF: one policy per grid preference
        known = [[round(x, 4) for x in g] for g in grid]
        off = [w for w in ask.preferences if [round(x, 4) for x in w] not in known]
        if off:
            raise ConfigError(f"preference: {off[0]} is not one of this {cfg.method.name} run's policies: {known}")
    settings = dataclasses.replace(generation_settings(cfg, eval_protocol=True), batch_size=ask.batch_size,
                                   greedy=ask.greedy, max_new_tokens=ask.max_new_tokens or cfg.task.max_new_tokens)
    rows: list[list[dict[str, Any]]] = [[] for _ in ask.prompts]
    for w in ask.preferences:
        prefs = torch.tensor([w] * len(ask.prompts))
        gen = responder.respond(ask.prompts, prefs, settings, seed=ask.seed)
        raw = reward_set.score(ask.prompts, gen.texts) if reward_set is not None else None
        norm = normalizer(raw) if raw is not None else None
        for i, (text, done) in enumerate(zip(gen.texts, gen.finished)):
            row = {"prompt": ask.prompts[i], "preference": dict(zip(objectives, w)), "response": text,
                   "finished": done}
            if raw is not None:
                row["raw"] = dict(zip(objectives, raw[i].tolist()))
                row["normalised"] = dict(zip(objectives, norm[i].tolist()))
            rows[i].append(row)
    return [r for per_prompt in rows for r in per_prompt]


def table(rows: list[dict[str, Any]], width: int = 100) -> str:
    """One block per prompt, one line per preference: the weights, the normalised scores (when scored) and
    the start of the answer."""
    out, current = [], None
    for r in rows:
        if r["prompt"] != current:
            current = r["prompt"]
            out.append(f"\n> {current[:width]}")
        w = " ".join(f"{k} {v:.2f}" for k, v in r["preference"].items())
        s = (" | " + " ".join(f"{k} {v:+.2f}" for k, v in r["normalised"].items())) if "normalised" in r else ""
        text = r["response"].replace("\n", " ")
        out.append(f"  [{w}]{s} | {text[:width]}{'...' if len(text) > width else ''}")
    return "\n".join(out)


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="generate")
def _main(cfg: DictConfig) -> None:
    with user_errors():
        run_cfg, _ = read_run(cfg.run_dir, cfg.checkpoint, trust=cfg.trust_run)
        prefs = parse_preferences(cfg.preference, list(run_cfg.task.objectives))
        if cfg.out and os.path.exists(cfg.out) and not os.path.isfile(cfg.out):
            raise ConfigError(f"out: {cfg.out} is a folder, not a file")
        ask = Ask(read_prompts(cfg.prompt, cfg.prompts_file), prefs, cfg.greedy, cfg.seed, cfg.score,
                  cfg.max_new_tokens, cfg.batch_size, cfg.dtype)
        rows = answer(cfg.run_dir, ask, cfg.checkpoint, cfg.trust_run)
    print(table(rows))
    if cfg.out:
        with open(cfg.out, "w") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")
        print(f"\n{len(rows)} answers: {cfg.out}")


def main() -> None:
    launch(_main, "run_dir")


if __name__ == "__main__":
    main()
