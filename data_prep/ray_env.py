"""Starting or joining Ray the same way everywhere in bertflow."""

from __future__ import annotations

import logging
import os
from typing import Any

log = logging.getLogger(__name__)


def init_ray(address: str | None = None, **kwargs: Any) -> Any:
    """Return the `ray` module, initialised.

    - Ray already initialised in this process: reuse it (tests share one local Ray).
    - `address=None`: start a private local Ray (`address="local"`), so a run never
      silently attaches to some other cluster that happens to be reachable.
    - an address ("ray://host:10001", "host:6379", "auto"): connect to that cluster.
    Usage stats are off and worker logs are not streamed to the driver unless asked.
    """
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray

    if os.environ.get("BERTFLOW_ROUTE_RAY_LOGS") == "1":
        # The bertflow CLI owns logging: Ray's records go through its handlers (terminal
        # filter + log file) instead of Ray's own stderr handler.
        ray_logger = logging.getLogger("ray")
        for handler in list(ray_logger.handlers):
            ray_logger.removeHandler(handler)
        ray_logger.propagate = True

    if ray.is_initialized():
        return ray
    options: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False,
                               "configure_logging": False}
    options.update(kwargs)
    if address is None:
        ray.init(address="local", **options)
        log.info("started a local Ray with %s CPUs", ray.cluster_resources().get("CPU"))
    else:
        options.pop("include_dashboard", None)  # only valid when starting a new cluster
        options.pop("num_cpus", None)
        ray.init(address=address, **options)
        log.info("connected to Ray at %s", address)
    return ray
