"""The policy and its sampling: loading it (:mod:`~meal.policy.model`), preference-aware LoRA
(:mod:`~meal.policy.preference_lora`), writing a preference into a prompt (:mod:`~meal.policy.templates`),
sampling (:mod:`~meal.policy.sampling`, :mod:`~meal.policy.vllm_backend`), a rollout scored by the rewards
(:mod:`~meal.policy.rollout`), the SFT losses and step (:mod:`~meal.policy.losses`) and the prompt
embeddings (:mod:`~meal.policy.embeddings`)."""
