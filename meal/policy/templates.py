"""Writing a preference into the prompt (method.md step 4).

One function, :func:`build_prompt`, is used by training, sampling and evaluation. The preference
is rendered as ``"<objective> <weight>, <objective> <weight>"`` with two decimals, e.g.

>>> format_preference([0.7, 0.3], ["coverage", "concise"])
'coverage 0.70, concise 0.30'
>>> parse_preference("Preference weights: coverage 0.70, concise 0.30", ["coverage", "concise"])
[0.7, 0.3]

and placed in the task's ``template.user`` at ``{preference}``; the task text goes at ``{text}``.
With ``template.chat`` the user turn is wrapped by the tokenizer's chat template (generation
prompt added); otherwise ``template.suffix`` is appended (for base models such as Llama-2).
"""

from __future__ import annotations

import re
from typing import Sequence

from meal.config import TemplateConfig


def format_preference(pref: Sequence[float], objectives: Sequence[str]) -> str:
    """Render a preference vector (K,) as text with two decimals per weight."""
    if len(pref) != len(objectives):
        raise ValueError(f"preference has {len(pref)} weights for {len(objectives)} objectives")
    return ", ".join(f"{name} {float(w):.2f}" for name, w in zip(objectives, pref))


def parse_preference(prompt: str, objectives: Sequence[str]) -> list[float]:
    """Read the preference back from a prompt written by :func:`build_prompt` (inverse of the format)."""
    pattern = r",\s*".join(rf"{re.escape(name)} (\d+\.\d\d)" for name in objectives)
    match = re.search(pattern, prompt)
    if match is None:
        raise ValueError(f"no preference over {list(objectives)} found in prompt")
    return [float(g) for g in match.groups()]


def format_scores(scores: Sequence[float], objectives: Sequence[str], decimals: int = 1) -> str:
    """Render desired normalised scores (RiC's rewards in context), e.g.

    >>> format_scores([1.26, -0.4], ["helpful", "concise"])
    'helpful 1.3, concise -0.4'
    """
    if len(scores) != len(objectives):
        raise ValueError(f"{len(scores)} scores for {len(objectives)} objectives")
    return ", ".join(f"{name} {float(s):.{decimals}f}" for name, s in zip(objectives, scores))


def build_prompt(template: TemplateConfig, text: str, pref: Sequence[float], objectives: Sequence[str],
                 tokenizer) -> str:
    """The full prompt string the policy sees for task ``text`` under preference ``pref``."""
    return render_prompt(template, text, format_preference(pref, objectives), tokenizer)


def render_prompt(template: TemplateConfig, text: str, preference_text: str, tokenizer) -> str:
    """The task's template around ``text`` with ``preference_text`` at ``{preference}``."""
    user = template.user.format(preference=preference_text, text=text)
    if not template.chat:
        return user + template.suffix
    messages = [{"role": "user", "content": user}]
    if template.system is not None:
        messages.insert(0, {"role": "system", "content": template.system})
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
