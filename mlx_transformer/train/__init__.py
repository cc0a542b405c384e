"""Training: the run's arguments (`args`), the loop (`trainer`, the `train` command), the optimizer
step (`step`), evaluation (`evaluate`), the run folder (`run_folder`; its lock `run_lock`, its
metrics log and loss curve `metrics`), the model to train (`model_setup`), LoRA adapters (`lora`)
and folding them in (`fuse`, the `fuse` command).

May import: config, errors, ops, model, checkpoint, data, generate (the device's free memory), cpu,
tokenizer_files.
"""
