"""`train.checkpoint_fraction = "auto"`: the chooser's arithmetic, by hand."""

import torch

from vlrl.activation_memory import GIB, choose, levels, optimizer_state_bytes, step_up


def test_the_least_recomputation_that_fits():
    # 4 layers; all recomputed: 10 GiB; 2 layers keeping their activations: 14 GiB, so 2 GiB a layer kept
    fit = lambda budget, extra=0: choose(4, 10 * GIB, 14 * GIB, 2, budget * GIB, extra * GIB, margin=0.0)  # noqa: E731
    assert fit(20).fraction == 0.0 and fit(20).predicted_peak == 18 * GIB  # none recomputed: 10 + 4 x 2
    assert fit(20, extra=4).fraction == 0.25  # AdamW's state to come: one layer recomputed, 10 + 3 x 2 + 4 = 20
    assert fit(12).fraction == 0.75 and fit(12).per_layer == 2 * GIB
    assert fit(9).fraction == 1.0  # nothing fits: recompute everything (and say so)
    assert choose(4, 10 * GIB, 14 * GIB, 2, 19 * GIB).fraction == 0.25  # the default 6% margin: 17.9 GiB usable
    assert "25% of 4 layers recomputed (3 keep their activations, 2.00 GiB each)" in fit(20, 4).describe(4)


def test_fractions_are_whole_layers_and_step_up_by_a_quarter():
    assert levels(4) == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert step_up(0.25, 36) == 0.5 and step_up(0.75, 36) == 1.0 and step_up(1.0, 36) == 1.0
    assert step_up(0.0, 2) == 0.5  # at least one layer more


def test_adamw_state_is_two_moments_per_trainable_parameter():
    params = [torch.zeros(10, 4, dtype=torch.bfloat16), torch.zeros(3)]
    assert optimizer_state_bytes(params) == 2 * (40 * 2 + 3 * 4)
