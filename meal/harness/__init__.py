"""The harness every method's recipe runs on: the run's config read once (:mod:`~meal.harness.settings`),
the checks before any model loads (:mod:`~meal.harness.preflight`: resume, data, rewards, the policy's source),
opening a run (:mod:`~meal.harness.run`: the policy, step 0 of :mod:`~meal.harness.conditioning`,
normalisation, logger), what it shows
(:mod:`~meal.harness.report`, :mod:`~meal.harness.tracking`, :mod:`~meal.harness.profiling`), what it keeps
(:mod:`~meal.harness.checkpoint`, :mod:`~meal.harness.budget`, the folder's writer rules
:mod:`~meal.harness.run_folder`), data parallelism (:mod:`~meal.harness.distributed`) and a finished run read
back (:mod:`~meal.harness.saved_run`)."""
