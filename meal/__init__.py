"""meal: Meal (MEta ALigner), multi-objective alignment of language models.

A preference-weight-net (meta-learner) proposes preference weights from prompt embeddings; the
policy (base-learner), conditioned on preferences written into its prompt, is trained by
rejection sampling against weighted multi-reward scores, and the net by backpropagating through
a one-step virtual update of the policy.

Where things are (the folders show the architecture):

- ``meal/cli/``: the commands (``train`` meal-train, ``evaluate`` meal-eval, ``generate``, ``export``,
  ``compare``) and what they share (``meal.cli``);
- ``meal/config.py``: the typed config outside the method node;
- ``meal/methods/``: the registry (``meal.methods``: each method registered once, with its config, checks,
  recipe and responder; ``meal.methods.train`` types a config and runs its method's recipe), one recipe per
  method (Meal's ``meal.methods.meal``, with its net and learner in ``bilevel`` and ``meta_learner``; RiC,
  MetaAligner; MORLHF and Rewarded Soups over ``grpo``);
- ``meal/harness/``: what every recipe runs on (``run.start_run`` opens and closes a run; ``conditioning``
  step 0; ``report``, ``tracking``, ``checkpoint``, ``budget``, ``distributed``; ``run_folder`` a run folder's
  writer rules; ``saved_run`` a finished run read, loaded and evaluated by every command that opens one);
- ``meal/policy/``: the policy and its sampling (model, preference-aware LoRA, templates, sampling, rollout,
  losses, embeddings, the vLLM backend);
- ``meal/evaluation/``: the front, its hypervolume and preference-following, its figure;
- ``meal/rewards/``, ``meal/tasks/``: the objectives and the data.

The commands import the rest, never the reverse (``tests/test_structure.py`` checks the import graph: no
circle, no library module importing a command).
"""

__version__ = "0.1.0"
