"""spark-submit entry for `llmrec generate-demo`: spark-submit jobs/generate_demo.py --ds YYYY-MM-DD [--env cluster]."""

import sys

from llmrec_spark.cli import main

if __name__ == "__main__":
    sys.exit(main(["generate-demo", *sys.argv[1:]]))
