"""`python -m fabric.trainer ARGS` is `fabric train ARGS`: what torchrun starts on every rank.

    torchrun --nnodes 2 --node-rank 0 --nproc-per-node 8 --master-addr HOST --master-port 29500 \\
        -m fabric.trainer --config rlvr.yaml
"""

from __future__ import annotations

import sys

from fabric.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
