"""The Spark glue of each stage (clean, embed, train-als, train-contrastive, recommend): read through io, transform, write."""
