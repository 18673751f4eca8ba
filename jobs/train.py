"""Ray Job entrypoint of a single GAPO training run on an existing pairs folder (``anisora-ray train``).

    ray job submit --address http://HEAD:8265 --working-dir . \
        -- python jobs/train.py --config configs/cogvideox5b_i2v.yaml --pairs s3://bucket/run/align/round-1/pairs
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from anisora_ray.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
