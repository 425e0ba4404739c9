"""The evaluation protocol: the front of a responder over the preference grid, its hypervolume and how well
it follows its preferences (:mod:`~meal.evaluation.front`), and its figure (:mod:`~meal.evaluation.plotting`)."""
