"""meal: Meal (MEta ALigner), multi-objective alignment of language models.

A preference-weight-net (meta-learner) proposes preference weights from prompt embeddings; the
policy (base-learner), conditioned on preferences written into its prompt, is trained by
rejection sampling against weighted multi-reward scores, and the net by backpropagating through
a one-step virtual update of the policy.

Where things are: ``meal.train`` / ``meal.evaluate`` / ``meal.generate`` / ``meal.export`` / ``meal.compare``
are the commands; ``meal.trainer`` types the config and picks the method's recipe; ``meal.harness`` opens
and closes a run for every recipe; ``meal.methods.<recipe>`` holds each method's loop (Meal's:
``meal.methods.meal``, with its meta-learner in ``meal.meta_learner`` and ``meal.meta``); ``meal.run_folder``
holds a run folder's rules and reads a finished run for every command that opens one (the commands import
it, never the reverse).
"""

__version__ = "0.1.0"
