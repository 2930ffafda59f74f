"""Set-up that every worker process of a local cluster started by `init_ray` runs first (Ray's
`worker_process_setup_hook`). Standard library only: each worker pays its imports at start-up."""

from __future__ import annotations

import logging

# A local cluster runs no dashboard, so it has no state API; Ray Train's PlacementGroupCleaner asks
# that API every second whether the Train controller is alive and logs a warning for each failed
# query: dozens of lines per SFT run on the console. The cleaner only matters when a controller dies
# while its cluster lives on, and a local cluster ends with its driver.
PLACEMENT_GROUP_CLEANER_LOGGER = "ray.train.v2._internal.execution.controller.placement_group_cleaner"


def setup_worker() -> None:
    logging.getLogger(PLACEMENT_GROUP_CLEANER_LOGGER).setLevel(logging.ERROR)
