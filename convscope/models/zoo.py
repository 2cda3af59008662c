"""Imports every family module so that their ``register_model`` rows exist."""

from convscope.models import alexnet, efficientnet_lite, resnet, small, tiny, vgg, zfnet  # noqa: F401
