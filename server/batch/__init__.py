"""`blipserve batch`: datasets (image folders, webdataset shards, parquet, OpenAI batch files) captioned
or questioned, resumably, here, against a running server (`--url`), or as a Ray Data pipeline (`--ray`)."""
