"""spark-submit entry for `llmrec clean`: spark-submit jobs/clean.py --ds YYYY-MM-DD [--env cluster]."""

import sys

from llmrec_spark.cli import main

if __name__ == "__main__":
    sys.exit(main(["clean", *sys.argv[1:]]))
