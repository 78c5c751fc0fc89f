"""spark-submit entry for `llmrec evaluate-protocols` (the weekly protocol suite):
spark-submit jobs/evaluate_protocols.py --ds YYYY-MM-DD [--env cluster]."""

import sys

from llmrec_spark.cli import main

if __name__ == "__main__":
    sys.exit(main(["evaluate-protocols", *sys.argv[1:]]))
