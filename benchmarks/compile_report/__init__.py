"""Compile every attention kernel with an accelerator's real compiler, on a CPU host.

One machinery for every target: the case table (``cases.py``), one subprocess per
compile with a timeout (a kernel compiled for the wrong architecture can abort its
process), the gates and the markdown report (``report.py``), the command line
(``__main__.py``). What differs per accelerator lives in one module per target, listed
in ``TARGETS``:

- ``cuda``: XLA's GPU pipeline for an H100 through the CUDA plugin's compile-only device,
  ``ptxas`` for sm_90a (``cuda.py``).
- ``tpu``: libtpu's compile-only topologies (``get_topology_desc("v5e:1x1",
  platform="tpu")``) for each TPU generation asked for, scoped VMEM from the compiled
  program's ``tpu_custom_call`` configs (``tpu.py``).

A target module provides ``NAME``; ``DEVICES`` (what a plain run compiles for: ``None``
is the target's default device) and ``TIMEOUT`` (seconds per compile); ``setup(workdir)``
(environment, before jax is imported); ``device(name)`` (the compile-only device and
``{"memory_limit": bytes, "arch": str}``); ``compile_on(device, fn, args)``;
``kernels(workdir, compiled, reference)`` (one dict per kernel, ``kernel`` and what the
target measures); ``versions()``; optionally ``case_facts(compiled, case, rows)`` (more
per case); and its report: ``gate(results, info)`` (offences, known offences),
``table(results, info)``, ``markdown(...)``. Cases name the targets they run on.

    PYTHONPATH=benchmarks python -m compile_report --target cuda   # nox -s gpu_compile
    PYTHONPATH=benchmarks python -m compile_report --target tpu    # nox -s tpu_compile
"""

TARGETS = ("cuda", "tpu")
