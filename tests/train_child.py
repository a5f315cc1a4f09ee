"""A trainer in its own process, for the tests that kill or signal it: python train_child.py CONFIG.json."""

import json
import logging
import os
import signal
import sys

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from streamtrain.config import parse_config
from streamtrain.trainer import train


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(threadName)s %(name)s: %(message)s")
    with open(sys.argv[1], encoding="utf-8") as fh:
        config = parse_config(json.load(fh))
    result = train(config, progress=False)
    print(result.model_dump_json(include={"reason", "start_position", "final_position", "samples_trained"}))
    return 130 if result.reason == "interrupt" else 0


if __name__ == "__main__":
    try:
        code = main()
    except KeyboardInterrupt:  # as the CLI: a Ctrl-C outside the run's own handling (before it, after it) exits 130
        code = 130
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a late signal of a burst: the run is over
    sys.exit(code)
