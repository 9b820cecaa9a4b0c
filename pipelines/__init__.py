"""The Ray layer: one folder per job, each with a `driver.run(cfg)` that `jobs/<job>.py` calls.

`common/` (Ray connection, storage, MLflow), `preprocess/` (Ray Data: assets -> shards), `synthesize/` (Ray Data:
images -> teacher-sample shards), `distill/` (Ray Train), `evaluate/` (Ray Data batch inference), `demo/` (all of
them on one local Ray instance), and `rehearse.py` (`python -m pipelines.rehearse`). The library they run is
`mdt/`, which imports neither Ray nor MLflow. Map: pipelines/README.md. Nothing heavy is imported here.
"""
