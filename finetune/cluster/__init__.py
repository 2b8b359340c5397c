"""Trainings and predictions on a Ray cluster that shares the registry: ``finetune serve --executor ray``,
``--predict-executor ray``.

- :mod:`.options`: the command line's choices (no Ray needed to read them);
- :mod:`.session`: joining the cluster, the node table;
- :mod:`.nodes`: which nodes see the registry (probed at start and when a node joins);
- :mod:`.runner`: what runs on the nodes (an actor per training attempt; Ray Train for several processes);
- :mod:`.executor`: the queue's executor seam over all of it (placement by Ray, retries after a lost node,
  re-attaching after a server restart);
- :mod:`.inference`: inference workers as Ray actors (``--predict-executor ray``): the actor, and the pool the
  prediction service talks to (routing by warm versions, then load; a lost actor replaced), over
  :mod:`.inference_actor` (what runs on the nodes: the local worker's core in an actor).

Import :class:`RayExecutor` from :mod:`.executor`; this package imports nothing of Ray by itself.
"""

from .options import EXECUTORS, ClusterOptions, PredictOptions, parse_resource, require_ray

__all__ = ["EXECUTORS", "ClusterOptions", "PredictOptions", "parse_resource", "require_ray"]
