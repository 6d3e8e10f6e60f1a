"""RepFusion from the store: precomputed teacher targets, the REINFORCE time-step policy, distillation.

    targets.py   z(t) for every sample x view x t of a K-point grid, at one layer, written once (the only
                 stage that runs the U-Net, truncated right after the layer)
    policy.py    pi(t|x), the decoder g and REINFORCE
    students.py  ResNet-18 (CIFAR stem), WRN-28-2, MobileNetV2
    losses.py    hint, attention transfer, RKD
    distill.py   distillation (policy + student) and fine-tuning with the no-distillation baseline
    analyze.py   singular values, effective rank and t-SNE of the targets per t
    config.py    the options of each command (torch-free: the CLI reads them at start-up)
    commands.py  the CLI commands: config -> result dict, printed as a table or JSON

The commands load on first use, so `diffstore.repfusion.config` loads without torch.
"""

__all__ = ["targets_command", "train_command", "finetune_command", "analyze_command"]


def __getattr__(name: str):
    if name in __all__:
        from . import commands

        return getattr(commands, name)
    raise AttributeError(f"module 'diffstore.repfusion' has no attribute {name!r}")
