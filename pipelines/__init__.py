"""Ray Data preprocessing: sources -> download -> render -> voxelize -> features -> encode -> shards.

The row contract, the stage interface and the shard schema are in pipelines/README.md. Submodules are
imported lazily (nothing heavy here): ``pipelines.graph.run(cfg)`` runs a job, ``pipelines.shards`` reads its
output for training.
"""
