"""Normalisation of the ImageNet-pretrained torchvision weights: the one definition that the data
transforms (src/data.py) and the model metadata (src/model.py) share, so that neither imports the other."""

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
