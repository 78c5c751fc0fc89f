"""spark-submit entry for `llmrec embed`: spark-submit jobs/embed.py --ds YYYY-MM-DD [--env cluster]."""

import sys

from llmrec_spark.cli import main

if __name__ == "__main__":
    sys.exit(main(["embed", *sys.argv[1:]]))
