"""The distillation job (Ray Train): `config` is its configuration (the trainer's plus the job's sections),
`driver` checks the arguments and resources and runs a `TorchTrainer`, `worker` is the loop each Ray Train worker
runs around `mdt.training.Trainer`, `training_data` turns shards into the workers' batches."""
