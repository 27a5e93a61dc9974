"""Performance measurement: the step benchmark behind `pretrain-bench` and the memory measurement
behind `pretrain-estimate-memory --measure`, both driving the trainer's train module."""
