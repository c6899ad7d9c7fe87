"""medformer-hf: Medformer for 2D and 3D medical images in the Hugging Face stack.

Importing the package registers Medformer with the Auto classes, so `AutoModel.from_pretrained(path)` works without
`trust_remote_code` where the package is installed; saved folders also carry the code for machines where it is not.
"""

from transformers import AutoConfig, AutoModel, AutoModelForImageClassification, AutoModelForPreTraining

from .configuration_medformer import MedformerConfig
from .modeling_medformer import (
    MedformerForImageClassification,
    MedformerForMultiTask,
    MedformerForPreTraining,
    MedformerForPreTrainingOutput,
    MedformerModel,
    MedformerModelOutput,
    MedformerMultiTaskOutput,
    MedformerPreTrainedModel,
    task_loss,
    task_probabilities,
)

AutoConfig.register("medformer", MedformerConfig, exist_ok=True)
AutoModel.register(MedformerConfig, MedformerModel, exist_ok=True)
AutoModelForPreTraining.register(MedformerConfig, MedformerForPreTraining, exist_ok=True)
AutoModelForImageClassification.register(MedformerConfig, MedformerForImageClassification, exist_ok=True)

__version__ = "0.1.0"

__all__ = [
    "MedformerConfig",
    "MedformerForImageClassification",
    "MedformerForMultiTask",
    "MedformerForPreTraining",
    "MedformerForPreTrainingOutput",
    "MedformerModel",
    "MedformerModelOutput",
    "MedformerMultiTaskOutput",
    "MedformerPreTrainedModel",
    "task_loss",
    "task_probabilities",
]
