"""Fine-tune with released nnU-Net from an export, as `nnUNetv2_train D C F -p PLANS -pretrained_weights X` does, short.

nnUNetv2_train looks its trainer up by name, walking nnunetv2/training/nnUNetTrainer; for any trainer but the default
(1000 epochs of 250 iterations) the walk imports primus/ and with it timm, which needs torchvision and so cannot be
installed beside a CPU torch. This passes nnU-Net's own `nnUNetTrainer_1epoch` class directly, sets its iterations
per epoch, and then runs run_training's own steps: `maybe_load_checkpoint` (nnU-Net's `load_pretrained_weights`),
`run_training`, `perform_actual_validation`.

usage: python nnunet_finetune.py DATASET CONFIGURATION FOLD PLANS EXPORT ITERATIONS
"""

from __future__ import annotations

import sys

import torch
from batchgenerators.utilities.file_and_folder_operations import join, load_json
from nnunetv2.paths import nnUNet_preprocessed
from nnunetv2.run.run_training import maybe_load_checkpoint
from nnunetv2.training.nnUNetTrainer.variants.training_length.nnUNetTrainer_Xepochs import nnUNetTrainer_1epoch
from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name


def main(argv: list[str]) -> None:
    dataset, configuration, fold, plans_name, export, iterations = argv
    folder = join(nnUNet_preprocessed, maybe_convert_to_dataset_name(int(dataset)))
    plans = load_json(join(folder, f"{plans_name}.json"))
    plans["continue_training"] = False  # what run_training's get_trainer_from_args adds
    trainer = nnUNetTrainer_1epoch(plans, configuration, int(fold), load_json(join(folder, "dataset.json")),
                                   device=torch.device("cpu"))  # fmt: skip
    trainer.num_iterations_per_epoch = trainer.num_val_iterations_per_epoch = int(iterations)
    maybe_load_checkpoint(trainer, False, False, export)
    trainer.run_training()
    trainer.perform_actual_validation(False)


if __name__ == "__main__":  # nnU-Net's validation starts spawn workers, which import this file again
    main(sys.argv[1:])
