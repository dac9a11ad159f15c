"""Training: one loop (`fastad.training.loop.train`) driven by each family's task
(`fastad.training.task.Task`, implemented next to the family's model)."""
