"""Best-of-N selection and scalarisation on hand-made scores."""

import torch

from meal.sampling import scalarise, select_best


def test_best_of_n_picks_the_argmax_of_hand_made_scores():
    scores = torch.tensor([[0.1, 0.9, 0.5, -2.0], [3.0, -1.0, 2.9, 0.0], [0.0, 0.0, 0.0, 1e-3]])
    assert select_best(scores).flatten().tolist() == [1, 0, 3]
    assert select_best(scores[:2], top_m=2).tolist() == [[1, 2], [0, 2]]


def test_scalarise_is_the_weighted_sum_per_response():
    """w = (0.25, 0.75); R = (2, 4) -> 0.5 + 3 = 3.5; R = (-4, 0) -> -1."""
    prefs = torch.tensor([[0.25, 0.75]])
    rewards = torch.tensor([[[2.0, 4.0], [-4.0, 0.0]]])
    torch.testing.assert_close(scalarise(prefs, rewards), torch.tensor([[3.5, -1.0]]))


def test_selection_under_different_preferences_differs():
    rewards = torch.tensor([[[1.0, -1.0], [-1.0, 1.0]]]).repeat(2, 1, 1)  # (2 prompts, N=2, K=2)
    prefs = torch.tensor([[0.9, 0.1], [0.1, 0.9]])
    assert select_best(scalarise(prefs, rewards)).flatten().tolist() == [0, 1]


def test_seeded_generation_is_repeatable_and_leaves_the_rng_alone(tiny_llama):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from meal.sampling import GenerationSettings, generate

    tok = AutoTokenizer.from_pretrained(tiny_llama)
    tok.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    settings = GenerationSettings(max_new_tokens=5)
    torch.manual_seed(123)
    before = torch.get_rng_state()
    a = generate(model, tok, ["hello", "world"], settings, generator_seed=7)
    assert torch.equal(torch.get_rng_state(), before)
    b = generate(model, tok, ["hello", "world"], settings, generator_seed=7)
    assert a.texts == b.texts
