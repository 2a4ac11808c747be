"""Which backend computes a call, per platform: the one named by ``implementation``, or
for ``None`` the first of ``_registry.candidates(platform)`` that does not refuse it.

The platform is the one the call runs on when known now (an eager call), else each
platform gets its branch of a ``platform_dependent`` and the lowering keeps one. A named
backend that refuses the call on some platforms gets no branch there (lowering the
program for such a platform fails); one that refuses it everywhere raises at once. Each
backend runs inside ``jax.named_scope("jaxmodules.attention/<name>")``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import jax

from . import _platforms as platforms
from . import _registry as registry
from ._call import Call
from ._checks import CheckedArguments
from ._platforms import DEFAULT, default_platform, on_platforms, prepared_platforms
from ._registry import Backend
from ._tile_program import UnsupportedCallError

SCOPE = "jaxmodules.attention/{}"


def refusals(call: Call, implementation: str | None, platform: str) -> dict[str, str | None]:
    """Why each backend tried on ``platform`` refuses ``call`` (``None``: it takes it),
    in the order tried, up to the first that takes it: the named one alone, or for
    ``None`` the candidates of the platform."""
    tried = (
        [registry.backend(implementation)]
        if implementation is not None
        else registry.candidates(platform)
    )
    answers: dict[str, str | None] = {}
    for backend in tried:
        answers[backend.name] = backend.refusal(call, platform)
        if answers[backend.name] is None:
            break
    return answers


def choose(call: Call, implementation: str | None, platform: str) -> Backend | str:
    """The backend that computes ``call`` on ``platform``, or why the named one refuses."""
    answers = refusals(call, implementation, platform)
    name, why = list(answers.items())[-1]
    if why is None:
        return registry.backend(name)
    if implementation is None:  # the block loop, last of every platform, takes all
        raise AssertionError(f"no backend takes the call on {platform!r}: {answers}")
    return why


def _refused(implementation: str, why: str) -> UnsupportedCallError:
    return UnsupportedCallError(
        f'implementation="{implementation}" cannot compute this call: {why}; '
        'implementation="xla" can'
    )


def _run(backend: Backend, call: Call, platform: str) -> tuple[Any, ...]:
    """``(out, lse)`` by ``backend`` (``(out,)`` when the call needs no lse)."""
    with jax.named_scope(SCOPE.format(backend.name)):
        out, lse = backend.run(call, platform)
    return (out, lse) if call.needs_lse else (out,)


def attend(args: CheckedArguments, implementation: str | None, return_lse: bool) -> tuple:
    """``(out, lse)`` of a checked call with 4-D inputs (``lse`` ``None`` when the call
    does not need it), by the backend chosen per platform."""
    call = Call(args, return_lse)
    platform = platforms.known_platform()
    if platform is not None:
        chosen = choose(call, implementation, platform)
        if isinstance(chosen, str):
            assert implementation is not None
            raise _refused(implementation, chosen)
        result = _run(chosen, call, platform)
    else:
        result = _per_platform(call, implementation)
    return (result[0], result[1] if call.needs_lse else None)


def _per_platform(call: Call, implementation: str | None) -> tuple[Any, ...]:
    """The call with one branch per platform, for a program whose platform is known when
    it is lowered (identical choices share a branch), for each platform prepared
    (``$JAXMODULES_ATTENTION_PLATFORMS``)."""
    chosen = {p: choose(call, implementation, p) for p in prepared_platforms()}
    taken = {p: b for p, b in chosen.items() if isinstance(b, Backend)}
    if not taken:
        assert implementation is not None
        here = default_platform()
        # Where this device's platform was not prepared, any prepared one's reason.
        why = chosen.get(here) or chosen.get(DEFAULT) or next(iter(chosen.values()))
        raise _refused(implementation, str(why))
    if len(taken) < len(chosen):
        taken.pop(DEFAULT, None)  # no catch-all for the platforms that refuse
    branches, kinds = {}, {}
    for p, backend in taken.items():
        kind = (backend.name, backend.variant(p))
        if kind not in kinds:
            kinds[kind] = _branch(backend, call, p)
        branches[p] = kinds[kind]
    return on_platforms(branches)


def _branch(backend: Backend, call: Call, platform: str) -> Any:
    def branch() -> tuple[Any, ...]:
        return _run(backend, call, platform)

    return branch


@dataclass(frozen=True)
class DispatchDecision:
    """What ``implementation`` does with a call on one platform.

    Attributes:
        platform: ``"cpu"``, ``"cuda"``, ``"rocm"``, ``"tpu"`` or ``"default"`` (any other).
        backend: The backend that computes the call there, or ``None`` when the named
            one refuses it.
        refusals: For each backend tried before it (or the named one that refuses), why.
        interpreted: Whether that backend runs in its interpret mode there.
    """

    platform: str
    backend: str | None
    refusals: dict[str, str]
    interpreted: bool = False

    def __str__(self) -> str:
        taken = "refused" if self.backend is None else self.backend
        if self.interpreted:
            taken += " (interpret mode)"
        lines = [f"{self.platform}: {taken}"]
        lines += [f"  {name} refuses: {why}" for name, why in self.refusals.items()]
        return "\n".join(lines)


def explain(
    args: CheckedArguments, implementation: str | None, return_lse: bool, platforms: tuple
) -> dict[str, DispatchDecision]:
    """A ``DispatchDecision`` per platform of ``platforms`` for a checked 4-D call."""
    call = Call(args, return_lse)
    decisions = {}
    for platform in platforms:
        answers = refusals(call, implementation, platform)
        name, why = list(answers.items())[-1]
        backend = registry.backend(name) if why is None else None
        decisions[platform] = DispatchDecision(
            platform,
            None if backend is None else backend.name,
            {n: w for n, w in answers.items() if w is not None},
            backend is not None and not backend.native(platform),
        )
    return decisions
