"""The preprocessing job (Ray Data): sources -> download -> render -> voxelize -> features -> encode -> shards.

`driver.run(cfg)` runs it (`jobs/preprocess.py`); `shards` reads its output for training. The row contract, the
stage interface and the shard schema are in pipelines/preprocess/README.md.
"""
