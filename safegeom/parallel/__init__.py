"""Everything that runs over several processes, and nothing else: the library stays single-process.

A launcher (``accelerate launch``, ``torchrun``) starts several processes; the entry points (the
command line and the audit and train runners) enter :func:`safegeom.parallel.dispatch.sharding`,
which installs the sharded twins of the library's batched leaves (:mod:`safegeom.execution`).

- :mod:`~safegeom.parallel.ranks`: who am I, my share of the work, collectives, failures that stop
  every rank; :mod:`~safegeom.parallel.process_group`: the process group under it.
- :mod:`~safegeom.parallel.dispatch`: :func:`~safegeom.parallel.dispatch.sharding` and the twin of
  each leaf.
- The sharded twins: :mod:`~safegeom.parallel.capture` (activations, statistics, shards on disk),
  :mod:`~safegeom.parallel.evaluation` (generation, refusal scores),
  :mod:`~safegeom.parallel.row_scores` (dealt row scores: carrier selection, cone scoring,
  sweeps), :mod:`~safegeom.parallel.sweeps` (generated refusals of a sweep),
  :mod:`~safegeom.parallel.encoding` (tokenizing shared out), :mod:`~safegeom.parallel.agreement`
  (a result agreed, a folder claimed by rank 0, who prints, device maps refused).
- Training: :mod:`~safegeom.parallel.ddp` (each rank its share of a step, gradients summed) and
  :mod:`~safegeom.parallel.fsdp` (weights sharded with FSDP2), used by the training loop.

Every module here may call the rank primitives; outside this package only the command line, the
audit runner and the training runner and loop do (a test scans for it).
"""
