"""Model adapters: one file per family, picked from the model's class by :func:`get_adapter`."""

from captum_vlm.adapters.base import (
    VLMAdapter,
    classes_for_tasks,
    get_adapter,
    register_adapter,
    supported_model_classes,
)
from captum_vlm.adapters.blip import BlipAdapter
from captum_vlm.adapters.blip2 import Blip2Adapter
from captum_vlm.adapters.clip import CLIPAdapter
from captum_vlm.adapters.gemma3 import Gemma3Adapter
from captum_vlm.adapters.idefics3 import Idefics3Adapter
from captum_vlm.adapters.instructblip import InstructBlipAdapter
from captum_vlm.adapters.llava import LlavaAdapter
from captum_vlm.adapters.llava_next import LlavaNextAdapter
from captum_vlm.adapters.paligemma import PaliGemmaAdapter
from captum_vlm.adapters.qwen_vl import QwenVLAdapter
from captum_vlm.adapters.siglip import SiglipAdapter
from captum_vlm.adapters.siglip2 import Siglip2Adapter
from captum_vlm.adapters.vilt import ViltAdapter

__all__ = [
    "VLMAdapter",
    "classes_for_tasks",
    "get_adapter",
    "register_adapter",
    "supported_model_classes",
    "CLIPAdapter",
    "SiglipAdapter",
    "Siglip2Adapter",
    "BlipAdapter",
    "Blip2Adapter",
    "InstructBlipAdapter",
    "ViltAdapter",
    "LlavaAdapter",
    "LlavaNextAdapter",
    "QwenVLAdapter",
    "PaliGemmaAdapter",
    "Gemma3Adapter",
    "Idefics3Adapter",
]
