"""Other checkpoint formats: Hugging Face ``transformers`` DETR folders and ``.safetensors`` files.

Nothing here imports the engine: :func:`detr_irpe.engine.checkpoint.load_checkpoint_file` calls
these readers, and :func:`detr_irpe.engine.convert.convert_checkpoint` these writers.
"""
from .hf_config import HFBackbone, backbone_from_hf, hf_config_from_model, model_config_from_hf
from .hf_weights import hf_to_ours, ours_to_hf
from .huggingface import (WRITTEN_FILES as HF_FOLDER_FILES, checkpoint_from_hf, download_from_hub, hf_weights_file, is_hf_folder, is_hub_id,
                          read_hf_config, read_processor_format, read_processor_size, save_hf_folder)
from .safetensors_io import load_safetensors, read_safetensors_weights, save_safetensors

__all__ = [
    "HF_FOLDER_FILES", "HFBackbone", "backbone_from_hf", "checkpoint_from_hf", "download_from_hub", "hf_config_from_model",
    "hf_to_ours", "hf_weights_file", "is_hf_folder", "is_hub_id", "load_safetensors", "model_config_from_hf",
    "ours_to_hf", "read_hf_config", "read_processor_format", "read_processor_size", "read_safetensors_weights", "save_hf_folder", "save_safetensors",
]
