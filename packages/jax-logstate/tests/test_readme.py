"""The original README's log_state examples, run as written."""

import textwrap

import jax.numpy as jnp
import numpy as np

README_EXAMPLES = textwrap.dedent(
    """
    from jaxmodules.logstate import Log, map_logs, list_of_logs
    import jax.numpy as jnp

    # Example 1: Embedding logs in a training state
    class TrainState:
        def __init__(self, params, optimizer_state):
            self.params = params
            self.optimizer_state = optimizer_state
            # Embed log data in the state
            self.activation_norm = Log(jnp.array(0.5))  # Log the activation norm
            self.gradient_norm = Log(jnp.array(0.1))   # Log the gradient norm

    state = TrainState(params={}, optimizer_state={})

    # Extract all logged values
    logs = list_of_logs(state)
    # logs = [0.5, 0.1]

    # Example 2: Processing logs after training step
    def process_logs(log_value):
        # Send to logging system, print, etc.
        print(f"Logged value: {log_value}")
        return log_value

    # Apply a function to all logs while preserving the structure
    updated_state = map_logs(process_logs, state)
    # This will print both logged values and return state with updated Log objects

    # Example 3: Clearing logs for next iteration
    def clear_logs(tree):
        return map_logs(lambda x: None, tree)

    state = clear_logs(state)  # All Log objects now contain None
    """
)


def run_readme(capsys):
    namespace: dict = {"__name__": "readme_examples"}
    exec(compile(README_EXAMPLES, "<readme>", "exec"), namespace)
    return namespace, capsys.readouterr().out


def test_example_1_lists_the_two_logged_values_in_attribute_order(capsys):
    namespace, _ = run_readme(capsys)
    logs = namespace["logs"]
    assert len(logs) == 2
    np.testing.assert_array_equal(logs[0], np.float32(0.5))
    np.testing.assert_array_equal(logs[1], np.float32(0.1))


def test_example_2_prints_each_value_once_and_keeps_the_structure(capsys):
    namespace, out = run_readme(capsys)
    # Independent reference: how the same f-string renders these arrays by itself.
    expected = "".join(f"Logged value: {v}\n" for v in (jnp.array(0.5), jnp.array(0.1)))
    assert out == expected
    updated = namespace["updated_state"]
    assert type(updated).__name__ == "TrainState"
    assert list(vars(updated)) == ["params", "optimizer_state", "activation_norm", "gradient_norm"]
    assert updated.params == {} and updated.optimizer_state == {}
    np.testing.assert_array_equal(updated.activation_norm.data, np.float32(0.5))
    np.testing.assert_array_equal(updated.gradient_norm.data, np.float32(0.1))


def test_example_3_clears_every_log_to_none_in_a_new_state(capsys):
    namespace, _ = run_readme(capsys)
    Log, list_of_logs = namespace["Log"], namespace["list_of_logs"]
    cleared = namespace["state"]
    assert isinstance(cleared.activation_norm, Log) and cleared.activation_norm.data is None
    assert isinstance(cleared.gradient_norm, Log) and cleared.gradient_norm.data is None
    assert list_of_logs(cleared) == [None, None]
    # Clearing made a new object: the state of Example 2 still has its values.
    assert cleared is not namespace["updated_state"]
    values = list_of_logs(namespace["updated_state"])
    np.testing.assert_array_equal(values, np.array([0.5, 0.1], np.float32))
