"""The library every trainer shares: the run loop and its checkpoints, workdir, events and
logs of metrics; the train state, optimizer and sharding; the start-up checks (`validate`,
`model_rules`); the MIM objective, a run's pictures, and ahead-of-time plans (`planning`,
behind `python -m beit_jax.plan`). The trainers themselves are in `beit_jax.trainers`."""
