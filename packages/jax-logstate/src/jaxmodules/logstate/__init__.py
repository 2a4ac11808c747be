"""Values to log, embedded anywhere in a pytree and read out after a jitted step.

Wrap a value in `Log` wherever it is computed and put it in the state (or the aux output)
a jitted step returns; after the step, `named_logs` / `fetch_logs` read every Log out by
its path, and `reset_logs` (structure kept) or `clear_logs` (data dropped) empty them for
the next step.

Values computed deep inside a model need no threading: `emit(name, value)` records a
value anywhere in the code `collect(fn)` runs, and `collect` returns them as named Logs
next to `fn`'s result; `scope(prefix)` names the emits of code called once per layer.
"""

from jaxmodules.logstate._collect import collect
from jaxmodules.logstate._emit import emit, scope
from jaxmodules.logstate._export import SummaryWriterLike, fetch_logs, write_tensorboard
from jaxmodules.logstate._log import Log
from jaxmodules.logstate._names import named_logs
from jaxmodules.logstate._reset import clear_logs, reset_logs
from jaxmodules.logstate._traverse import list_of_logs, map_logs

__all__ = [
    "Log",
    "SummaryWriterLike",
    "clear_logs",
    "collect",
    "emit",
    "fetch_logs",
    "list_of_logs",
    "map_logs",
    "named_logs",
    "reset_logs",
    "scope",
    "write_tensorboard",
]
