"""The training layer: settings and schedule, the training loop, evaluation (COCO AP), training
one architecture end to end, and reignition."""
