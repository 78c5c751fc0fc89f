"""spark-submit entry for `llmrec train-contrastive`: spark-submit jobs/train_contrastive.py --ds YYYY-MM-DD [--env cluster]."""

import sys

from llmrec_spark.cli import main

if __name__ == "__main__":
    sys.exit(main(["train-contrastive", *sys.argv[1:]]))
