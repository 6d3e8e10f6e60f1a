"""RepFusion from the store: precomputed teacher targets, the REINFORCE time-step policy, distillation.

    targets.py   z(t) for every sample x view x t of a K-point grid, at one layer, written once (the only
                 stage that runs the U-Net, truncated right after the layer)
    policy.py    pi(t|x), the decoder g and REINFORCE
    students.py  ResNet-18 (CIFAR stem), WRN-28-2, MobileNetV2
    losses.py    hint, attention transfer, RKD
    distill.py   distillation (policy + student) and fine-tuning with the no-distillation baseline
    analyze.py   singular values, effective rank and t-SNE of the targets per t
    commands.py  the CLI commands: config -> result dict, printed as a table or JSON
"""

from .commands import analyze_command, finetune_command, targets_command, train_command

__all__ = ["targets_command", "train_command", "finetune_command", "analyze_command"]
