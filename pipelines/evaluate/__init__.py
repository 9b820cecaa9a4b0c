"""The evaluation job: a student and its teacher sampled on held-out shards, metrics logged (`driver.run`)."""
