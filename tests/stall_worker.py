"""The training worker with one rank that never arrives (python -m stall_worker JOB.json): the
rank named by STALL_RANK sleeps past every collective's timeout before it starts training, so
the job's timeout tests need no hook in alloy.runtime.worker."""

import os
import sys
import time

from alloy.runtime import worker

STALL_RANK = int(os.environ["STALL_RANK"])


class StallingTrainer(worker.Trainer):
    def run(self) -> None:
        if self.rank == STALL_RANK:
            time.sleep(10 * self.timeout.total_seconds())
        super().run()


worker.Trainer = StallingTrainer  # run_worker builds its Trainer by this name
sys.exit(worker.main())
