"""The harness every method's recipe runs on: the run's config read once (:mod:`~meal.harness.settings`),
opening a run (:mod:`~meal.harness.run`: checks, data, rewards,
the policy, step 0 of :mod:`~meal.harness.conditioning`, normalisation, logger, resume), what it shows
(:mod:`~meal.harness.report`, :mod:`~meal.harness.tracking`, :mod:`~meal.harness.profiling`), what it keeps
(:mod:`~meal.harness.checkpoint`, :mod:`~meal.harness.budget`, the folder's writer rules
:mod:`~meal.harness.run_folder`), data parallelism (:mod:`~meal.harness.distributed`) and a finished run read
back (:mod:`~meal.harness.saved_run`)."""
