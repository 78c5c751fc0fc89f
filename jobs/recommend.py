"""spark-submit entry for `llmrec recommend`: spark-submit jobs/recommend.py --ds YYYY-MM-DD [--env cluster]."""

import sys

from llmrec_spark.cli import main

if __name__ == "__main__":
    sys.exit(main(["recommend", *sys.argv[1:]]))
