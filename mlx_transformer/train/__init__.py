"""Training: the run's arguments (`args`), the loop (`trainer`, the `train` command), the optimizer
step (`step`), evaluation (`evaluate`), the run folder (`run_folder`), the model to train
(`model_setup`), LoRA adapters (`lora`) and folding them in (`fuse`, the `fuse` command).

May import: config, errors, model, checkpoint, data, cpu.
"""
