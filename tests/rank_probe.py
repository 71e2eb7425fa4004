"""A stand-in worker for launch tests: records which node's job file started it and the ranks
torchrun gave it (python -m rank_probe JOB.json)."""

import json
import os
import sys
from pathlib import Path

job_path = Path(sys.argv[1])
node = int(job_path.stem.removeprefix("job-node"))
(job_path.parent / f"rank{os.environ['RANK']}.json").write_text(json.dumps(
    {"node": node, "rank": int(os.environ["RANK"]), "group_rank": int(os.environ["GROUP_RANK"])}))
