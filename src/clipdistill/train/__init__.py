"""Distillation engine (issue 7): run config, data position, GradCache accumulation, checkpoints,
torchrun/DDP/FSDP, the training loop (`engine.train`) and `clipdistill demo`."""
