"""blsp: give a text LLM ears (BLSP, Wang et al. 2023, arXiv 2309.00916).

    from blsp import BlspModel
    model = BlspModel.from_pretrained("runs/demo/adapter")
    model.generate(audio="clip.wav", instruction="Write down the following speech word for word, and nothing else.")
"""

from .errors import BlspError, CheckpointError, InputError
from .modeling import BlspConfig, BlspModel
from .prompts import CONTINUATION_INSTRUCTION, TASK_INSTRUCTIONS, task_instruction

__all__ = [
    "BlspConfig",
    "BlspError",
    "BlspModel",
    "CONTINUATION_INSTRUCTION",
    "CheckpointError",
    "InputError",
    "TASK_INSTRUCTIONS",
    "task_instruction",
]
__version__ = "0.1.0"
