"""meal: Meal (MEta ALigner), multi-objective alignment of language models.

A preference-weight-net (meta-learner) proposes preference weights from prompt embeddings; the
policy (base-learner), conditioned on preferences written into its prompt, is trained by
rejection sampling against weighted multi-reward scores, and the net by backpropagating through
a one-step virtual update of the policy.

Where things are: ``meal.train`` / ``meal.evaluate`` / ``meal.generate`` / ``meal.export`` / ``meal.compare``
are the commands (what they share: ``meal.cli``); ``meal.config`` is the typed config outside the method node;
``meal.methods`` is the registry (each method registered once: its config, checks, recipe and responder)
and ``meal.methods.train`` types a config and runs its method's recipe; ``meal.harness`` opens and closes a
run for every recipe; ``meal.methods.<name>`` holds each method's loop (Meal's: ``meal.methods.meal``, with
its meta-learner in ``meal.meta_learner`` and ``meal.meta``; MORLHF and Rewarded Soups share
``meal.methods.grpo``); ``meal.run_folder`` holds a run folder's writer rules and ``meal.saved_run`` reads,
loads and evaluates a finished run for every command that opens one (the commands import them, never the
reverse; ``tests/test_structure.py`` checks the import graph).
"""

__version__ = "0.1.0"
