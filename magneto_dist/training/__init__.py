"""Engine set-up, the training loop, schedules, tasks and metrics."""
