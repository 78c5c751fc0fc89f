"""spark-submit entry for `llmrec nightly`: spark-submit jobs/nightly.py --ds YYYY-MM-DD [--env cluster]."""

import sys

from llmrec_spark.cli import main

if __name__ == "__main__":
    sys.exit(main(["nightly", *sys.argv[1:]]))
