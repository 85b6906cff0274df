"""crosscheck's bounds: they pass two orders of the same sums and fail a real difference."""

import numpy as np

from tangshi_jax.crosscheck import GRADIENT_TOLERANCE, LOSS_ROUNDING, Step, compare, gradient_gaps, loss_bound


def step(loss, grads, params):
    return Step(loss, arrays(grads), params)


PARAMS = {"a": np.ones(3, np.float32), "b": np.zeros(2, np.float32)}
GRADS = {"a": [0.3, -0.4, 0.0], "b": [1e-3, 2e-3]}


def arrays(tree):
    return {name: np.asarray(value, np.float32) for name, value in tree.items()}


def test_gaps_are_relative_to_each_parameters_gradient():
    gaps = gradient_gaps(arrays({"a": [0.3, -0.4, 0.0], "b": [1e-3, 2.1e-3]}), arrays(GRADS))
    assert gaps["a"] == 0
    np.testing.assert_allclose(gaps["b"], 1e-4 / np.linalg.norm([1e-3, 2e-3]), rtol=1e-5)  # float32 inputs
    # nonzero where the reference is exactly zero: no relative gap can pass
    assert gradient_gaps(arrays({"z": [1e-9]}), arrays({"z": [0.0]}))["z"] == np.inf


def test_the_loss_bound_grows_with_how_far_the_parameters_moved():
    same = step(2.0, GRADS, PARAMS)
    assert loss_bound(same, same) == LOSS_ROUNDING * 2.0
    moved = step(2.0, GRADS, {"a": PARAMS["a"] + np.float32(1e-3), "b": PARAMS["b"]})
    gradient_norm = np.sqrt(0.09 + 0.16 + 1e-6 + 4e-6)
    expected = LOSS_ROUNDING * 2 + 2 * gradient_norm * np.sqrt(3) * 1e-3
    np.testing.assert_allclose(loss_bound(same, moved), expected, rtol=1e-4)


def test_compare_passes_rounding_and_names_what_fails():
    reference = [step(2.0, GRADS, PARAMS), step(1.5, GRADS, PARAMS)]
    rounded = [step(2.0 + 1e-6, {"a": [0.3, -0.4, 0.0], "b": [1e-3, 2e-3 + 1e-10]}, PARAMS), reference[1]]
    lines, failures = compare(rounded, reference)
    assert failures == [] and len(lines) == 3
    wrong_gradient = [step(2.0, {"a": [0.3, -0.4, 0.0], "b": [1e-3, 2e-3 * (1 + 10 * GRADIENT_TOLERANCE)]}, PARAMS)]
    _, failures = compare(wrong_gradient, reference[:1])
    assert len(failures) == 1 and "gradient of b" in failures[0]
    wrong_loss = [reference[0], step(1.5 + 1e-3, GRADS, PARAMS)]  # same parameters: only rounding allowed
    _, failures = compare(wrong_loss, reference)
    assert len(failures) == 1 and failures[0].startswith("step 2: losses")
    nan = [step(float("nan"), GRADS, PARAMS)]
    assert compare(nan, reference[:1])[1]  # a NaN is never within a bound
