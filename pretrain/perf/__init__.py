"""Performance: the benchmark behind `pretrain-bench` and the memory-efficient output loss."""
