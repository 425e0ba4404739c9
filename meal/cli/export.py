"""``meal-export``: a trained run at one preference as a standard Hugging Face model folder.

    meal-export run_dir=RUN preference=[0.2,0.8] out=exported/helpful-0.2

The folder loads with ``AutoModelForCausalLM.from_pretrained(out)`` and ``AutoTokenizer.from_pretrained(out)``
(chat template included), with no meal import, and answers as meal does at that preference: the weights
the run's method answers with at w are folded into plain linear layers (preference-aware LoRA: W + (alpha/r)
(B_0 A_0 + sum_k w_k B_k A_k), exact up to float rounding; a peft LoRA: merged; Rewarded Soups: the experts'
interpolation at w; MORLHF: the policy trained at w, one of its grid). ``format=adapter`` writes a standard
peft LoRA adapter instead, for the base model: at a fixed w the preference-aware blocks are one ordinary LoRA
of rank (K+1) r (A = [A_0; ...; A_K], B = [B_0, w_1 B_1, ..., w_K B_K]: exact), a peft LoRA is itself; load it
with ``PeftModel.from_pretrained(base, out)``. The preference stays in the prompt as
well, as in training: ``meal_prompt.json`` holds the prompt template with the preference written in, and
the model card (README.md) says how to build a prompt, what the run was (method, objectives, reward
statistics, the front's point at w, cost) and the base model. RiC: its model, with the desired scores its map
gives at w written into the prompt template (what it reads instead of weights). MetaAligner (a policy and a
corrector: two models) is refused, naming why.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from typing import Any

import hydra
import torch
from omegaconf import DictConfig
from torch import nn

from meal.cli import CONF_DIR, launch, parse_preferences, user_errors
from meal.config import ConfigError
from meal.harness.saved_run import check_dtype, load_run, read_run

log = logging.getLogger("meal")


def _unwrap_preference_lora(model: nn.Module, w: list[float]
                            ) -> dict[str, tuple[torch.Tensor, torch.Tensor, float, nn.Linear]]:
    """Put every preference-aware LoRA layer's base ``nn.Linear`` back in its place and return, per layer name,
    its update at ``w`` as one ordinary LoRA (A ((K+1) r, in), B (out, (K+1) r), scale, base): scale * B A =
    scale * sum_k c_k B_k A_k with A = [A_0; ...; A_K], B = [c_0 B_0 | ... | c_K B_K], c = (1, w), in float32."""
    from meal.policy.preference_lora import PreferenceLoRALinear

    coef = torch.tensor([1.0] + list(w))
    out = {}
    for name, mod in list(model.named_modules()):
        if not isinstance(mod, PreferenceLoRALinear):
            continue
        a, b = mod.pref_lora_A.detach().float(), mod.pref_lora_B.detach().float()  # (K+1, r, in), (K+1, out, r)
        k1, r = a.shape[:2]
        out[name] = (a.reshape(k1 * r, -1), (b * coef.to(b.device).view(k1, 1, 1)).permute(1, 0, 2)
                     .reshape(b.shape[1], k1 * r), mod.scale, mod.base)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, mod.base)
    if hasattr(model, "meal_preference"):
        del model.meal_preference
    return out


def fold_preference_lora(model: nn.Module, w: list[float]) -> nn.Module:
    """Replace every preference-aware LoRA layer by its base ``nn.Linear`` with the update at ``w`` folded
    in: W + scale * sum_k c_k B_k A_k, c = (1, w_1, ..., w_K) (computed in float32, stored in W's dtype)."""
    with torch.no_grad():
        for a, b, scale, base in _unwrap_preference_lora(model, w).values():
            base.weight.copy_((base.weight.float() + scale * (b @ a)).to(base.weight.dtype))
    return model


def preference_lora_as_peft(model: nn.Module, w: list[float], base_id: str) -> nn.Module:
    """The preference-aware adapters at ``w`` as one ordinary peft LoRA of rank (K+1) r on the base layers
    (:func:`_unwrap_preference_lora`); ``lora_alpha = scale (K+1) r`` keeps peft's alpha / r at the adapter's
    scale. Exact, in float32."""
    from peft import LoraConfig, get_peft_model

    mats = _unwrap_preference_lora(model, w)
    (scale, rank), = {(s, a.shape[0]) for a, _, s, _ in mats.values()}  # one shape everywhere (attach_preference_lora)
    peft_model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=scale * rank, lora_dropout=0.0,
                                                  target_modules=sorted(mats), bias="none"))
    with torch.no_grad():
        for name, (a, b, _, _) in mats.items():
            layer = peft_model.base_model.model.get_submodule(name)
            layer.lora_A["default"].weight.copy_(a)
            layer.lora_B["default"].weight.copy_(b)
    peft_model.peft_config["default"].base_model_name_or_path = base_id
    return peft_model


def adapter_model(model: nn.Module, w: list[float], base_id: str) -> nn.Module:
    """The policy at ``w`` as a peft model whose ``save_pretrained`` writes a standard LoRA adapter."""
    from meal.policy.preference_lora import has_preference_lora

    if has_preference_lora(model):
        return preference_lora_as_peft(model, w, base_id)
    model.peft_config["default"].base_model_name_or_path = base_id  # a peft LoRA: itself
    return model


def base_model_ref(policy) -> tuple[str, str | None]:
    """Where plain transformers finds the run's base model: (folder or Hub id, GGUF file name or None); a
    ``pkg://`` policy (the embedded default) is its installed package's folder."""
    from meal.policy.model import package_folder

    path = policy.name_or_path
    return (package_folder(path) if path.startswith("pkg://") else path), policy.get("gguf_file")


def plain_model(model: nn.Module, w: list[float]) -> nn.Module:
    """The policy as a plain transformers model at ``w``: preference-aware LoRA folded, peft LoRA merged."""
    from meal.policy.preference_lora import has_preference_lora

    if has_preference_lora(model):
        return fold_preference_lora(model, w)
    if hasattr(model, "merge_and_unload"):  # a peft model
        return model.merge_and_unload()
    return model


def prompt_template(cfg, w: list[float], words: str) -> dict[str, Any]:
    """How the exported model is prompted at ``w``: the task's template with ``words`` (the responder's
    ``preference_text(w)``: the weights, or RiC's desired scores) written in (``{text}`` left for the user's
    prompt); chat models: the user turn (and system prompt) of the chat template, with the generation prompt
    added."""
    t = cfg.task.template
    user = t.user.replace("{text}", "\x00").format(preference=words)
    return {"chat": bool(t.chat), "system": t.system, "user": user.replace("\x00", "{text}"),
            "suffix": "" if t.chat else t.suffix, "preference": dict(zip(cfg.task.objectives, w)), "written": words}


@dataclass
class Export:
    """How a run is exported: ``fmt`` merged (a plain model folder) or adapter (a peft LoRA for the base
    model); ``dtype`` the policy is loaded, folded and saved in (float32: the update at w kept whole; a bf16
    fold rounds it into the base weights, which drops part of it); which checkpoint; whether an existing
    ``out`` is replaced; whether a run folder naming code outside meal's own is opened."""

    fmt: str = "merged"
    dtype: str = "float32"
    checkpoint: str = "latest"
    overwrite: bool = False
    trust: bool = False


def export_run(run_dir: str, w: list[float], out: str, how: Export | None = None) -> str:
    """Write ``run_dir`` at preference ``w`` into ``out`` (a model folder, or with ``how.fmt="adapter"`` a peft
    LoRA adapter, with its tokenizer, meal_prompt.json and a model card); returns ``out``. Everything is
    checked before the policy loads; nothing is written on error."""
    from meal.methods import get

    how = how or Export()
    fmt, checkpoint, trust = how.fmt, how.checkpoint, how.trust
    if fmt not in ("merged", "adapter"):
        raise ConfigError(f"format: merged | adapter, got {fmt!r}")
    check_dtype(how.dtype)
    cfg, folder = read_run(run_dir, checkpoint, trust=trust)
    if fmt == "adapter" and not cfg.policy.lora.enabled:
        raise ConfigError(f"format: {run_dir} trained every weight of its policy (policy.lora.enabled=false): "
                          f"there is no adapter to write; export format=merged")
    method = get(cfg.method.recipe)
    if method.not_exportable:
        raise ConfigError(f"run_dir: {run_dir} is a {cfg.method.recipe} run: {method.not_exportable}")
    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)) and not how.overwrite:
        raise ConfigError(f"out: {out} exists and is not empty (pass overwrite=true to replace it)")
    cfg, model, tok, folder = load_run(run_dir, checkpoint, trust=trust, dtype=how.dtype)
    responder = method.responder(cfg, model, tok, run_dir)
    grid = responder.grid
    if grid is not None and not any(torch.allclose(torch.tensor(g), torch.tensor(w), atol=1e-4) for g in grid):
        raise ConfigError(f"preference: {w} is not one of this {cfg.method.name} run's policies: {grid}")
    responder.load_weights(w)  # the weights this method answers with at w (a soup's mix, MORLHF's policy)
    model = plain_model(model, w) if fmt == "merged" else adapter_model(model, w, base_model_ref(cfg.policy)[0])
    if os.path.exists(out) and how.overwrite:
        import shutil

        shutil.rmtree(out) if os.path.isdir(out) else os.remove(out)
    tmp = out.rstrip("/") + ".partial"
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    prompt = prompt_template(cfg, w, responder.preference_text(w))
    with open(os.path.join(tmp, "meal_prompt.json"), "w") as f:
        json.dump(prompt, f, indent=2)
    with open(os.path.join(tmp, "README.md"), "w") as f:
        f.write(model_card(cfg, run_dir, folder, w, prompt, how))
    os.replace(tmp, out)
    return out


def model_card(cfg, run_dir: str, folder: str, w: list[float], prompt: dict[str, Any], how: Export) -> str:
    """What the exported folder is: method, preference, objectives, reward statistics, the front's point at w
    (when the run's front holds it), the run's cost, the base model, and how to prompt it."""
    from meal.harness.checkpoint import load_state

    objectives = list(cfg.task.objectives)
    pref = ", ".join(f"{o} {x:.2f}" for o, x in zip(objectives, w))
    base, gguf_file = base_model_ref(cfg.policy)
    gguf = f", gguf_file={gguf_file!r}" if gguf_file else ""
    fmt = how.fmt
    rounded = ("" if how.dtype == "float32" else " The fold was rounded to this dtype, which drops part of the "
               "update (`meal-export dtype=float32` keeps it whole).")
    what = (f"A plain transformers causal LM: the weights the method answers with at this preference, folded into "
            f"the base model `{base}` in {how.dtype} (its licence applies).{rounded}" if fmt == "merged" else
            f"A peft LoRA adapter for the base model `{base}`{' (' + gguf_file + ')' if gguf else ''} "
            f"(its licence applies): the adapters the method answers with at this preference, as one ordinary "
            f"LoRA (exact).")
    load = (["tok, model = AutoTokenizer.from_pretrained(DIR), AutoModelForCausalLM.from_pretrained(DIR)"]
            if fmt == "merged" else
            ["from peft import PeftModel", "",
             f"base = AutoModelForCausalLM.from_pretrained({base!r}{gguf})",
             "tok, model = AutoTokenizer.from_pretrained(DIR), PeftModel.from_pretrained(base, DIR)"])
    lines = [f"# {cfg.method.name} on {cfg.task.name}, at preference {pref}", "",
             f"Exported by `meal-export` from `{run_dir}` (checkpoint `{os.path.basename(folder)}`). {what}", "",
             "## Prompt", "",
             "The preference is also written into every prompt, as in training (`meal_prompt.json`):", "",
             "```python", "import json", "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
             *load,
             "p = json.load(open(f\"{DIR}/meal_prompt.json\"))",
             "user = p[\"user\"].format(text=QUESTION)",
             "if p[\"chat\"]:",
             "    messages = ([{\"role\": \"system\", \"content\": p[\"system\"]}] if p[\"system\"] else []) + "
             "[{\"role\": \"user\", \"content\": user}]",
             "    prompt = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)",
             "else:", "    prompt = user + p[\"suffix\"]", "```", "",
             f"User turn: `{prompt['user']}`", ""]
    lines += [f"Written into the prompt at this preference: `{prompt['written']}` (the weights; a "
              f"rewards-in-context model such as RiC reads the desired normalised scores its map gives at w).", ""]
    stats = os.path.join(run_dir, "reward_stats.json")
    if os.path.exists(stats):
        s = json.load(open(stats))
        lines += ["## Rewards", "", "Objectives and the run's reward normalisation (mean, std of raw scores): "
                  + "; ".join(f"{o}: {m:.4g}, {d:.4g}"
                              for o, m, d in zip(objectives, s.get("mean", []), s.get("std", []))),
                  ""]
    front_path = os.path.join(run_dir, "front.json")
    if os.path.exists(front_path):
        front = json.load(open(front_path))
        at = [i for i, p in enumerate(front["preferences"]) if all(abs(a - b) < 1e-4 for a, b in zip(p, w))]
        lines += ["## The run's front", "", f"Hypervolume {front['hypervolume']:.4f} on {front['num_prompts']} "
                  f"{front.get('extra', {}).get('split', 'test')} prompts."]
        if at:
            point = ", ".join(f"{o} {v:+.3f}" for o, v in zip(objectives, front["points"][at[0]]))
            lines.append(f"At this preference: mean normalised rewards {point}.")
        lines.append("")
    state = load_state(os.path.join(folder, "state.pt"))
    budget = state.get("budget") or {}
    if budget:
        lines += ["## Cost", "", "Online training: " + ", ".join(f"{k} {v:.0f}" if isinstance(v, float) else f"{k} {v}"
                                                              for k, v in budget.items()), ""]
    return "\n".join(lines)


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="export")
def _main(cfg: DictConfig) -> None:
    with user_errors():
        run_cfg, _ = read_run(cfg.run_dir, cfg.checkpoint, trust=cfg.trust_run)
        prefs = parse_preferences(cfg.preference, list(run_cfg.task.objectives))
        if len(prefs) != 1:
            raise ConfigError(f"preference: export one preference at a time, got {len(prefs)}")
        out = export_run(cfg.run_dir, prefs[0], cfg.out, Export(cfg.format, cfg.dtype, cfg.checkpoint, cfg.overwrite,
                                                                cfg.trust_run))
    load = (f"AutoModelForCausalLM.from_pretrained({out!r})" if cfg.format == "merged" else
            f"PeftModel.from_pretrained(base, {out!r}), base: {base_model_ref(run_cfg.policy)})")
    print(f"exported: {out} ({load}; prompt: {out}/meal_prompt.json, card: {out}/README.md)")


def main() -> None:
    launch(_main, "run_dir")


if __name__ == "__main__":
    main()
