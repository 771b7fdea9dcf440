"""steerdiff's ComfyUI node pack: link this folder into ComfyUI's ``custom_nodes`` (with steerdiff pip-installed in
ComfyUI's Python) to get the momentum samplers for SamplerCustom / SamplerCustomAdvanced and a guider for every
steerdiff guidance rule.  See docs/comfyui.md."""

from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
