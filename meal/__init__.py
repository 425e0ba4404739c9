"""meal: Meal (MEta ALigner), multi-objective alignment of language models.

A preference-weight-net (meta-learner) proposes preference weights from prompt embeddings; the
policy (base-learner), conditioned on preferences written into its prompt, is trained by
rejection sampling against weighted multi-reward scores, and the net by backpropagating through
a one-step virtual update of the policy. See ``meal.trainer`` for the loop.
"""

__version__ = "0.1.0"
