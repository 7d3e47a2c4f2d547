"""The model layer: architecture codes, the serial backbone, the parallel neck, Faster R-CNN
assembly, descriptions, cost measures, torchvision conversion, weight inheritance and
checkpoints. Torch only: no config files, no object storage."""
