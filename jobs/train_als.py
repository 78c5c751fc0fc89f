"""spark-submit entry for `llmrec train-als`: spark-submit jobs/train_als.py --ds YYYY-MM-DD [--env cluster]."""

import sys

from llmrec_spark.cli import main

if __name__ == "__main__":
    sys.exit(main(["train-als", *sys.argv[1:]]))
