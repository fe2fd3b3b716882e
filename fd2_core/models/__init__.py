"""Models of FD²: backbones by name, the CAL head, and the model that joins them."""

from .cal_head import CALHead, CALOutput, bilinear_attention_pool
from .convnet import ConvNetBN, convnet_depth
from .fd2_model import FD2Model, ModelOutput, build_model
from .registry import BACKBONES, FeatureBackbone, build_backbone
from .torchvision_nets import MobileNetV2Backbone, ResNetBackbone
from .weights import load_model_weights, read_state_dict, save_model_weights

__all__ = [
    "BACKBONES",
    "CALHead",
    "CALOutput",
    "ConvNetBN",
    "FD2Model",
    "FeatureBackbone",
    "MobileNetV2Backbone",
    "ModelOutput",
    "ResNetBackbone",
    "bilinear_attention_pool",
    "build_backbone",
    "build_model",
    "convnet_depth",
    "load_model_weights",
    "read_state_dict",
    "save_model_weights",
]
