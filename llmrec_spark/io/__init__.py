"""Reading and writing: Delta tables (embedded or Spark engine), landing sources, public datasets, views, demo data."""
