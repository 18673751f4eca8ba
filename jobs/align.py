"""Ray Job entrypoint of the main job (``anisora-ray align``).

    ray job submit --address http://HEAD:8265 --working-dir . --runtime-env jobs/runtime_env.yaml \
        -- python jobs/align.py --config configs/cogvideox5b_i2v.yaml [--resume] [--set KEY=VALUE ...]

The driver joins the cluster it was submitted to (``RAY_ADDRESS``); ``--resume`` continues a
job whose driver died from its last finished phase (state under ``run.output_dir``).
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the uploaded working dir

from anisora_ray.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["align", *sys.argv[1:]]))
