#!/usr/bin/env bash
# helpful_assistant at real scale: Meal and static over seeds 0,1,2, evaluated and compared (see README.md here).
# Run: bash experiments/helpful_assistant/run.sh   (LAUNCH=hydra/launcher=slurm_gpu for Slurm; EXTRA=more overrides)
exec "$(dirname "$0")/../paper_task.sh" helpful_assistant
