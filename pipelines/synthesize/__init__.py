"""The teacher-sample job: the preprocessing graph with an image lister and one `Synthesize` stage that writes
teacher samples as shard rows (`driver.run`)."""
